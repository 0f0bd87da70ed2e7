//! A client's causal context token: any bytes a client sends must decode to a version vector or
//! a clear error, and what decodes must survive a round trip through the encoder. Half the inputs
//! are sealed with a valid header and checksum first, so that the body's decoder is reached too.
#![no_main]

use dynakv_core::context::{decode_context, encode_context, seal_body_for_fuzzing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // The cluster tag is part of the token: take it from the input too.
    let (tag, body) = match rest.split_first_chunk::<4>() {
        Some((tag, body)) => (u32::from_le_bytes(*tag), body),
        None => (0, rest),
    };
    let token = if mode & 1 == 1 {
        // The body starts with the cluster tag; most inputs should name the right one.
        let mut sealed = tag.to_le_bytes().to_vec();
        sealed.extend_from_slice(body);
        seal_body_for_fuzzing(&sealed)
    } else {
        body.to_vec()
    };
    if let Ok(vv) = decode_context(&token, tag) {
        let again =
            decode_context(&encode_context(&vv, tag), tag).expect("an encoded context decodes");
        assert_eq!(again, vv);
    }
});
