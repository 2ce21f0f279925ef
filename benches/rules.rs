//! Criterion bench of `Rules::check`: the cost of one decision with 1 rule and with 10,000
//! (a /32 blocklist; a mix of target CIDRs, name suffixes, client CIDRs and port rules), for an
//! IP target and for a name. The end-to-end figure (loadgen's connection rate with these rule
//! sets) is in results/2026-12-02-rules-cps.md; this one shows where the nanoseconds go.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use ringsocks::rules::{Action, Command, Dest, Policy, Request, RuleSpec, Rules};

fn rule(action: Action, f: impl FnOnce(&mut RuleSpec)) -> RuleSpec {
    let mut r = RuleSpec::new(action);
    f(&mut r);
    r
}

fn allow_loopback() -> RuleSpec {
    rule(Action::Allow, |r| {
        r.to = vec![Dest::parse("127.0.0.0/8").unwrap()]
    })
}

fn blocklist() -> Vec<RuleSpec> {
    let mut v: Vec<RuleSpec> = (0..10_000)
        .map(|i| {
            rule(Action::Deny, |r| {
                r.to = vec![Dest::parse(&format!("198.51.{}.{}", i / 250, i % 250 + 1)).unwrap()]
            })
        })
        .collect();
    v.push(allow_loopback());
    v
}

fn mixed() -> Vec<RuleSpec> {
    let mut v: Vec<RuleSpec> = (0..10_000)
        .map(|i| {
            rule(Action::Deny, |r| match i % 4 {
                0 => {
                    r.to =
                        vec![Dest::parse(&format!("198.51.{}.{}", i / 250, i % 250 + 1)).unwrap()]
                }
                1 => r.to = vec![Dest::parse(&format!("*.blocked{i}.example")).unwrap()],
                2 => r.from = vec![format!("10.{}.{}.0/24", i / 250, i % 250).parse().unwrap()],
                _ => {
                    r.to = vec![Dest::parse(&format!("10.{}.{}.0/24", i / 250, i % 250)).unwrap()];
                    r.ports = vec![(1000 + i as u16, 1000 + i as u16)];
                }
            })
        })
        .collect();
    v.push(allow_loopback());
    v.push(rule(Action::Allow, |r| {
        r.to = vec![Dest::parse("*.example.com").unwrap()]
    }));
    v
}

fn bench_check(c: &mut Criterion) {
    let client: IpAddr = "127.0.0.1".parse().unwrap();
    let ip = Request {
        client,
        user: None,
        command: Command::Connect,
        name: None,
        ip: Some("127.0.0.1".parse().unwrap()),
        port: 8080,
    };
    let name = Request {
        name: Some(b"www.a.example.com"),
        ip: None,
        ..ip
    };
    let mut g = c.benchmark_group("rules_check");
    for (what, rules) in [
        (
            "1 rule",
            vec![
                allow_loopback(),
                rule(Action::Allow, |r| {
                    r.to = vec![Dest::parse("*.example.com").unwrap()]
                }),
            ],
        ),
        ("10k /32 blocklist", blocklist()),
        ("10k mixed", mixed()),
    ] {
        let rules = Rules::new(rules, Policy::default());
        g.bench_function(format!("{what}, IP target"), |b| {
            b.iter(|| rules.check(black_box(&ip)))
        });
        g.bench_function(format!("{what}, name target"), |b| {
            b.iter(|| rules.check(black_box(&name)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_check);
criterion_main!(benches);
