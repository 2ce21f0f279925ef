#!/usr/bin/env python3
"""Writes the rule sets of results/2026-12-02-rules-cps.md into /tmp/rb (none, one, cidr10k, mixed10k)."""
import os
os.makedirs("/tmp/rb", exist_ok=True)
open("/tmp/rb/none.toml", "w").write("# no rules\n")
open("/tmp/rb/one.toml", "w").write('[[rule]]\naction = "allow"\nto = ["127.0.0.0/8"]\n')
with open("/tmp/rb/cidr10k.toml", "w") as f:
    for i in range(10000):
        f.write('[[rule]]\naction = "deny"\nto = ["198.51.%d.%d/32"]\n' % (i // 250, i % 250 + 1))
    f.write('[[rule]]\naction = "allow"\nto = ["127.0.0.0/8"]\n')
with open("/tmp/rb/mixed10k.toml", "w") as f:
    for i in range(10000):
        k = i % 4
        if k == 0:
            f.write('[[rule]]\naction = "deny"\nto = ["198.51.%d.%d/32"]\n' % (i // 250, i % 250 + 1))
        elif k == 1:
            f.write('[[rule]]\naction = "deny"\nto = ["*.blocked%d.example"]\n' % i)
        elif k == 2:
            f.write('[[rule]]\naction = "deny"\nfrom = ["10.%d.%d.0/24"]\n' % (i // 250, i % 250))
        else:
            f.write('[[rule]]\naction = "deny"\nto = ["10.%d.%d.0/24"]\nports = [%d]\n' % (i // 250, i % 250, 1000 + i))
    f.write('[[rule]]\naction = "allow"\nto = ["127.0.0.0/8"]\n')
