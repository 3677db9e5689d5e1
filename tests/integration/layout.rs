//! The architecture the folders promise, checked: the domain crate depends on no AWS SDK and
//! no C code, and inside a crate the modules import each other one way only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn dependencies(package: &str) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO"))
        .args(["tree", "--locked", "--offline", "-p", package, "-e", "normal,build", "--prefix", "none"])
        .args(["--format", "{p}"])
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn the_domain_crate_depends_on_no_aws_sdk_and_no_c_code() {
    let core = dependencies("agentpay-core");
    assert!(core.contains("serde_json") && core.contains("alloy-primitives"), "{core:?}");
    let foreign: Vec<_> = core
        .iter()
        .filter(|name| {
            name.starts_with("aws-")
                || name.ends_with("-sys")
                || ["cc", "cmake", "rusqlite", "hyper", "lambda_runtime"].contains(&name.as_str())
        })
        .collect();
    assert!(foreign.is_empty(), "agentpay-core depends on {foreign:?}");
    // The check sees what it should: the SQLite adapter does build C.
    assert!(dependencies("agentpay-sqlite").iter().any(|name| name.ends_with("-sys")));
}

/// Top-level module -> the top-level modules it names through `crate::`, from the code
/// before its `#[cfg(test)]` (tests may reach anywhere).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.to_path_buf()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let relative = path.strip_prefix(src).unwrap();
        let top =
            relative.components().next().unwrap().as_os_str().to_str().unwrap().trim_end_matches(".rs").to_owned();
        // `tests.rs` files are test modules (declared under `#[cfg(test)]`).
        let is_tests = path.file_name().is_some_and(|n| n == "tests.rs");
        if ["lib", "main"].contains(&top.as_str()) || is_tests || path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let edges = graph.entry(top.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name != top && !name.is_empty() {
                edges.insert(name);
            }
        }
    }
    graph
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn modules_import_each_other_one_way() {
    for src in ["crates/agentpay-core/src", "src"] {
        let graph = module_graph(&PathBuf::from(ROOT).join(src));
        assert!(graph.len() >= 3, "{src}: {graph:?}");
        assert_eq!(find_cycle(&graph), None, "{src}: modules import each other in a circle");
    }
    // The check finds a cycle where there is one.
    let mut broken = module_graph(&PathBuf::from(ROOT).join("crates/agentpay-core/src"));
    broken.get_mut("money").unwrap().insert("steps".into());
    assert!(find_cycle(&broken).is_some_and(|c| c.contains(&"money".to_owned())));
}
