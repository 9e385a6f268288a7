//! An upstream's answer body through the broker's parser. Nothing may panic, and whatever is
//! accepted is a proxy URL the broker could hand to a feed: it passes the proxy URL rules and is at
//! most 2,048 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_broker::upstream::parse_answer;
use proxy_broker_core::validate::{MAX_PROXY_URL_LEN, check_proxy_url};

fuzz_target!(|data: &[u8]| {
    if let Ok(answer) = parse_answer(data, 300) {
        assert!(answer.proxy_url.len() <= MAX_PROXY_URL_LEN);
        assert!(check_proxy_url(&answer.proxy_url).is_ok());
        assert!(answer.ttl_seconds >= 60);
    }
});
