//! Medians of the repetitions per system and figure, and the `"A/B"`
//! ratios of medians of each system to the references (direct loopback,
//! Dante, microsocks) measured in the same run.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::figures::Figure;
use crate::relays::Kind;

pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians per system and figure, from the `runs` of a suite document.
pub fn medians(values: &BTreeMap<String, BTreeMap<String, Vec<f64>>>) -> Value {
    let mut m = serde_json::Map::new();
    for (sys, figs) in values {
        let mut o = serde_json::Map::new();
        for (k, v) in figs {
            o.insert(k.clone(), json!(median(v)));
        }
        m.insert(sys.clone(), Value::Object(o));
    }
    Value::Object(m)
}

/// `"A/B"` ratios (A's median over B's, for every figure) for every system
/// A but direct loopback and every reference B present (direct loopback and
/// the peers Dante and microsocks), so each reads "A is x times B".
pub fn ratios(medians: &Value, present: &[String], figures: &[Figure]) -> Value {
    let mut out = serde_json::Map::new();
    for a in present {
        for b in present {
            let (Some(ka), Some(kb)) = (Kind::from_name(a), Kind::from_name(b)) else {
                continue;
            };
            if a == b || !kb.is_reference() || ka == Kind::Direct {
                continue;
            }
            let mut o = serde_json::Map::new();
            for f in figures {
                let va = medians[a][f.key].as_f64();
                let vb = medians[b][f.key].as_f64();
                let r = match (va, vb) {
                    (Some(x), Some(y)) if y > 0.0 => json!(x / y),
                    _ => Value::Null,
                };
                o.insert(f.key.into(), r);
            }
            out.insert(format!("{a}/{b}"), Value::Object(o));
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::super::figures::FIGURES;
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratios_to_references_only() {
        let meds = json!({
            "direct": {"tput1_gbps": 20.0},
            "ringsocks-splice": {"tput1_gbps": 10.0},
            "microsocks": {"tput1_gbps": 2.0},
        });
        let names: Vec<String> = ["direct", "ringsocks-splice", "microsocks"]
            .map(String::from)
            .to_vec();
        let r = ratios(&meds, &names, &FIGURES);
        assert_eq!(r["ringsocks-splice/direct"]["tput1_gbps"], 0.5);
        assert_eq!(r["ringsocks-splice/microsocks"]["tput1_gbps"], 5.0);
        assert_eq!(r["microsocks/direct"]["tput1_gbps"], 0.1);
        assert!(r.get("direct/microsocks").is_none());
        assert!(r.get("microsocks/ringsocks-splice").is_none());
        assert!(r["ringsocks-splice/direct"]["cps"].is_null());
    }
}
