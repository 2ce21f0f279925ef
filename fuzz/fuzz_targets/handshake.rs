//! Fuzzes the server handshake machine: the first byte picks auth on/off
//! and a chunk size, the rest is the client's stream. Asserts that feeding
//! it in chunks gives the same outcome as feeding it whole, which is the
//! property the shard depends on when reads split messages arbitrarily.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringsocks::proto::{ServerHandshake, Step, Users};

fn run(stream: &[u8], chunk: usize, users: Option<&Users>) -> (Step, usize, Vec<u8>) {
    let mut hs = ServerHandshake::new();
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut end = 0;
    loop {
        end = (end + chunk).min(stream.len());
        let (step, n) = hs.advance(&stream[consumed..end], users, &mut out);
        consumed += n;
        assert!(consumed <= end);
        if step != Step::NeedMore || end == stream.len() {
            // A finished machine must keep answering without panicking.
            let _ = hs.advance(&stream[consumed..], users, &mut Vec::new());
            return (step, consumed, out);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let mut users = Users::new();
    users.insert(b"user", b"pass");
    let users = (ctl & 1 == 1).then_some(&users);
    let chunk = usize::from(ctl >> 1).max(1);
    let whole = run(stream, stream.len().max(1), users);
    assert_eq!(run(stream, chunk, users), whole);
});
