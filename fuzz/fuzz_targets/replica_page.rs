//! A page of a replica stream (`Replica.Pull`, what a joining node reads from its sources): any
//! bytes on the wire must decode to a page or an error, and each entry's clock to a clock or an
//! error, as the handoff does before it merges anything.
#![no_main]

use dynakv_core::dvvset::Clock;
use dynakv_node::proto::PullPage;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(page) = PullPage::decode(data) else {
        return;
    };
    for entry in &page.entries {
        if let Ok(clock) = Clock::decode(&entry.clock) {
            assert_eq!(Clock::decode(&clock.to_bytes()).as_ref(), Ok(&clock));
        }
    }
    for hash in &page.summary {
        let _ = <[u8; 16]>::try_from(hash.as_ref()).map(u128::from_le_bytes);
    }
});
