//! Criterion benches for the hot parts of the SOCKS5 codec: request decode
//! (once per connection), the whole pipelined server handshake, and the UDP
//! header codec (once per datagram, so the one that matters most).

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringsocks::proto::codec::{decode_request, encode_greeting, encode_request, encode_userpass};
use ringsocks::proto::udp::{decode_udp_header, encode_udp_header, MAX_UDP_HEADER_LEN};
use ringsocks::proto::{Addr, Command, Method, ServerHandshake, Users};

fn request_bytes(dst: &Addr) -> Vec<u8> {
    let mut v = Vec::new();
    encode_request(Command::CONNECT, dst, &mut v);
    v
}

fn bench_decode_request(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_request");
    let v4 = request_bytes(&Addr::Ip("93.184.216.34:443".parse().unwrap()));
    let domain = request_bytes(&Addr::domain(b"www.example.com", 443).unwrap());
    g.bench_function("ipv4", |b| b.iter(|| decode_request(black_box(&v4))));
    g.bench_function("domain", |b| b.iter(|| decode_request(black_box(&domain))));
    g.finish();
}

fn bench_handshake(c: &mut Criterion) {
    let dst = Addr::domain(b"www.example.com", 443).unwrap();
    let mut no_auth = Vec::new();
    encode_greeting(&[Method::NO_AUTH], &mut no_auth);
    encode_request(Command::CONNECT, &dst, &mut no_auth);
    no_auth.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");

    let mut users = Users::new();
    users.insert(b"user", b"correct horse battery staple");
    let mut with_auth = Vec::new();
    encode_greeting(
        &[Method::NO_AUTH, Method::USERNAME_PASSWORD],
        &mut with_auth,
    );
    encode_userpass(b"user", b"correct horse battery staple", &mut with_auth).unwrap();
    encode_request(Command::CONNECT, &dst, &mut with_auth);

    let mut g = c.benchmark_group("server_handshake_pipelined");
    let mut out = Vec::with_capacity(64);
    g.bench_function("no_auth", |b| {
        b.iter(|| {
            out.clear();
            let mut hs = ServerHandshake::new();
            black_box(hs.advance(black_box(&no_auth), None, &mut out))
        })
    });
    g.bench_function("userpass", |b| {
        b.iter(|| {
            out.clear();
            let mut hs = ServerHandshake::new();
            black_box(hs.advance(black_box(&with_auth), Some(&users), &mut out))
        })
    });
    g.finish();
}

fn bench_udp(c: &mut Criterion) {
    let mut g = c.benchmark_group("udp_header");
    g.throughput(Throughput::Elements(1));
    let src4: SocketAddr = "8.8.8.8:53".parse().unwrap();
    let src6: SocketAddr = "[2001:4860:4860::8888]:53".parse().unwrap();
    let mut dg = [0u8; 512];
    let n = encode_udp_header(0, &src4, &mut dg);
    let dg4 = dg[..n + 64].to_vec();
    let n = encode_udp_header(0, &src6, &mut dg);
    let dg6 = dg[..n + 64].to_vec();
    g.bench_function("decode_ipv4", |b| {
        b.iter(|| decode_udp_header(black_box(&dg4)))
    });
    g.bench_function("decode_ipv6", |b| {
        b.iter(|| decode_udp_header(black_box(&dg6)))
    });
    let mut hdr = [0u8; MAX_UDP_HEADER_LEN];
    g.bench_function("encode_ipv4", |b| {
        b.iter(|| encode_udp_header(0, black_box(&src4), &mut hdr))
    });
    g.bench_function("encode_ipv6", |b| {
        b.iter(|| encode_udp_header(0, black_box(&src6), &mut hdr))
    });
    g.finish();
}

criterion_group!(benches, bench_decode_request, bench_handshake, bench_udp);
criterion_main!(benches);
