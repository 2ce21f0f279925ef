//! Fuzzes the PROXY protocol header decoder, `ringsocks::proto::proxy::decode`.
//!
//! Besides "never panics", it checks what the accept path relies on: a header is never
//! longer than `MAX_HEADER` nor counted past its end (bytes after it do not change the
//! verdict), `MAX_HEADER` bytes always get a verdict, the verdict does not depend on where
//! a read stopped (a prefix is `NeedMore` or has the whole input's verdict), and decoded
//! addresses are the bytes on the wire.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringsocks::proto::proxy::{decode, Parsed, ProxyAddrs, MAX_HEADER};

fuzz_target!(|data: &[u8]| {
    let whole = decode(data);
    // Callers bound their buffering by MAX_HEADER.
    assert!(data.len() < MAX_HEADER || whole != Ok(Parsed::NeedMore));
    // A few cut points rather than every prefix, to keep each run linear.
    for cut in [1, data.len() / 2, data.len().saturating_sub(1)] {
        if cut < data.len() {
            let part = decode(&data[..cut]);
            assert!(
                part == Ok(Parsed::NeedMore) || part == whole,
                "{cut}: {part:?}"
            );
        }
    }
    let Ok(Parsed::Done { addrs, consumed }) = whole else {
        return;
    };
    assert!(0 < consumed && consumed <= data.len() && consumed <= MAX_HEADER);
    assert_eq!(decode(&data[..consumed]), whole);
    assert_eq!(decode(&data[..consumed - 1]), Ok(Parsed::NeedMore));
    let ProxyAddrs::Tcp { src, dst } = addrs else {
        return;
    };
    assert_eq!(src.is_ipv4(), dst.is_ipv4());
    let header = &data[..consumed];
    if header.starts_with(b"PROXY TCP4 ") {
        // Dotted quads without leading zeros have one spelling: the line must re-encode exactly.
        let line = format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            src.ip(),
            dst.ip(),
            src.port(),
            dst.port()
        );
        assert_eq!(line.as_bytes(), header);
    } else if !header.starts_with(b"PROXY ") {
        let a = &header[16..];
        let n = if src.is_ipv4() { 4 } else { 16 };
        for (i, ip) in [src.ip(), dst.ip()].into_iter().enumerate() {
            let octets = match ip {
                std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
                std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
            };
            assert_eq!(&a[i * n..(i + 1) * n], &octets[..]);
        }
        assert_eq!(&a[2 * n..2 * n + 2], &src.port().to_be_bytes());
        assert_eq!(&a[2 * n + 2..2 * n + 4], &dst.port().to_be_bytes());
    }
});
