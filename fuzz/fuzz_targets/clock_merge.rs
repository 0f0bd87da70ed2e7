//! Clocks from peers (replica writes, handoff and anti-entropy pages): any bytes must decode to a
//! valid DVVSet or a clear error, and merging any two decoded clocks must neither panic nor give
//! a clock that fails its own decoder.
#![no_main]

use dynakv_core::dvvset::Clock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte says where the first clock ends.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let (a, b) = rest.split_at((split as usize).min(rest.len()));
    let (Ok(a), b) = (Clock::decode(a), Clock::decode(b)) else {
        return;
    };
    assert_eq!(Clock::decode(&a.to_bytes()).as_ref(), Ok(&a), "round trip");
    let Ok(b) = b else {
        // One clock alone: syncing with itself changes nothing.
        assert_eq!(a.sync(&a), a);
        return;
    };
    for merged in [a.sync(&b), b.sync(&a), a.sync(&b).lww_resolve()] {
        let bytes = merged.to_bytes();
        assert_eq!(bytes.len(), merged.encoded_len());
        assert_eq!(
            Clock::decode(&bytes).as_ref(),
            Ok(&merged),
            "a merge decodes"
        );
    }
});
