//! docs/operations.md's walkthrough, run as written: every line of its `sh` blocks, in order,
//! against real processes. Only the addresses move (a random 127.x.y.0/24 block instead of
//! 127.0.0.0/24, so the test never meets a `dynakv dev` someone runs by hand) and the working
//! directory is a temporary one. Lines ending in `&` run in the background until the test ends.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{DYNAKV, random_u64, wait_until};

/// Kills the background processes when the test ends, however it ends.
struct Background(Vec<(String, Child)>);

impl Drop for Background {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The walkthrough's commands: every non-comment line of the `sh` blocks under its heading.
fn walkthrough() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .expect("read docs/operations.md");
    let section = doc
        .split("## Walkthrough")
        .nth(1)
        .expect("docs/operations.md has a Walkthrough section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut lines = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = line.trim() == "```sh";
            continue;
        }
        let line = line.split(" #").next().unwrap_or(line).trim();
        if in_block && !line.is_empty() && !line.starts_with('#') {
            lines.push(line.to_string());
        }
    }
    lines
}

fn status_json(endpoints: &str) -> Option<serde_json::Value> {
    let out = Command::new(DYNAKV)
        .args(["cluster", "status", "-o", "json", "-e", endpoints])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn members(status: &serde_json::Value) -> Vec<(String, String, u64, String)> {
    status["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["id"].as_str().unwrap_or("").to_string(),
                        m["state"].as_str().unwrap_or("").to_string(),
                        m["weight"].as_u64().unwrap_or(0),
                        m["lifecycle"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_operations_walkthrough_runs_as_written() {
    let lines = walkthrough();
    assert!(
        lines.len() >= 10,
        "the walkthrough has its commands: {lines:?}"
    );
    let dir = tempfile::tempdir().expect("a working directory");
    let r = random_u64();
    let prefix = format!("127.{}.{}.", 16 + (r % 239), (r >> 8) % 256);
    let endpoints = (2..=4)
        .map(|i| format!("{prefix}{i}:7100"))
        .collect::<Vec<_>>()
        .join(",");
    let mut background = Background(Vec::new());
    for line in &lines {
        let (command, in_background) = match line.strip_suffix('&') {
            Some(c) => (c.trim().to_string(), true),
            None => (line.clone(), false),
        };
        let mut command = command.replace("127.0.0.", &prefix);
        if command.starts_with("dynakv dev") {
            command.push_str(&format!(" --base-ip {prefix}2"));
        }
        let args = shell_words(&command);
        assert_eq!(
            args[0], "dynakv",
            "the walkthrough only runs dynakv: {line}"
        );
        let mut cmd = Command::new(DYNAKV);
        cmd.args(&args[1..])
            .current_dir(dir.path())
            .env("DYNAKV_ENDPOINT", &endpoints)
            .env_remove("DYNAKV_CONFIG")
            .stdin(Stdio::null());
        eprintln!("$ {command}");
        if in_background {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            background.0.push((
                command.clone(),
                cmd.spawn().expect("start a background command"),
            ));
            // Wait until what it started serves: the dev cluster, or the one node.
            let (node, expect) = if command.starts_with("dynakv dev") {
                (endpoints.clone(), 3)
            } else {
                let listen = args
                    .iter()
                    .position(|a| a == "--listen")
                    .map(|i| args[i + 1].clone())
                    .expect("a background serve names --listen");
                (listen, 1)
            };
            wait_until(
                &format!("`{command}` serves"),
                Duration::from_secs(60),
                || {
                    let s = status_json(&node)?;
                    let alive = members(&s).iter().filter(|m| m.1 == "alive").count();
                    (alive >= expect).then_some(())
                },
            );
            continue;
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run `{command}`: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{stdout}{stderr}");
        assert!(
            out.status.success(),
            "`{command}` failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
    }
    // Where the walkthrough ends: three normal members, n4 and n5 left, the cart still there.
    let status = status_json(&endpoints).expect("the cluster answers");
    let mut ms = members(&status);
    ms.sort();
    let summary: Vec<(String, u64, String)> =
        ms.into_iter().map(|(id, _, w, l)| (id, w, l)).collect();
    assert_eq!(
        summary,
        vec![
            ("n1".into(), 100, "normal".into()),
            ("n2".into(), 100, "normal".into()),
            ("n3".into(), 100, "normal".into()),
            ("n4".into(), 0, "left".into()),
            ("n5".into(), 0, "left".into()),
        ]
    );
    let out = Command::new(DYNAKV)
        .args(["get", "cart:42", "-o", "json", "-e", &endpoints])
        .output()
        .expect("get");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(got["values"][0]["value"], "[\"book\"]", "{got}");
}

/// Splits a command line the way the shell would for the walkthrough's simple commands:
/// whitespace, with single-quoted words kept whole.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}
