//! How client results are printed: text for people, `-o json` for machines.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::proto::{Receipt, Sibling};

/// A value as JSON: UTF-8 text as is, anything else in base64.
pub fn value_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => json!({ "value": s, "encoding": "utf8" }),
        Err(_) => json!({ "value": B64.encode(bytes), "encoding": "base64" }),
    }
}

pub fn sibling_json(s: &Sibling) -> Value {
    let mut v = value_json(&s.value);
    v["timestamp"] = json!(s.timestamp);
    v
}

pub fn receipt_json(r: Option<&Receipt>) -> Value {
    let Some(r) = r else { return Value::Null };
    json!({
        "coordinator": r.coordinator,
        "needed": r.needed,
        "got": r.got,
        "replicas": r.replicas.iter().map(|p| json!({
            "node": p.node,
            "ok": p.ok,
            "fallback": p.fallback,
            "hint_for": if p.hint_for.is_empty() { Value::Null } else { json!(p.hint_for) },
            "error": if p.error.is_empty() { Value::Null } else { json!(p.error) },
            "late": p.late,
        })).collect::<Vec<_>>(),
        "hinted": r.hinted,
        "siblings": r.siblings,
        "ring_version": format!("{:016x}", r.ring_version),
        "forwarded": r.forwarded,
    })
}

/// One line for people: "ok (coordinator n1; acks n1, n2; W=2)".
pub fn receipt_text(r: Option<&Receipt>) -> String {
    let Some(r) = r else {
        return String::new();
    };
    let acks: Vec<String> = r
        .replicas
        .iter()
        .filter(|p| p.ok)
        .map(|p| {
            if p.fallback {
                format!("{} (for {})", p.node, p.hint_for)
            } else {
                p.node.clone()
            }
        })
        .collect();
    let failed: Vec<String> = r
        .replicas
        .iter()
        .filter(|p| !p.ok)
        .map(|p| format!("{} {}", p.node, p.error))
        .collect();
    let mut s = format!(
        "coordinator {}; {}/{} needed: {}",
        r.coordinator,
        r.got,
        r.needed,
        acks.join(", ")
    );
    if !failed.is_empty() {
        s.push_str(&format!("; failed: {}", failed.join(", ")));
    }
    if r.hinted {
        s.push_str("; hinted");
    }
    s
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}
