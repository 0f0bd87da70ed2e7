//! The node's configuration file: any text must parse and validate or give an error, never a
//! panic; what validates must survive a round trip through the YAML writer.
#![no_main]

use dynakv_node::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_yaml(text) else {
        return;
    };
    let yaml = config.to_yaml();
    if config.clone().validate().is_ok() {
        let again = Config::from_yaml(&yaml).expect("a written config parses");
        assert!(
            again.validate().is_ok(),
            "a written valid config validates:\n{yaml}"
        );
    }
});
