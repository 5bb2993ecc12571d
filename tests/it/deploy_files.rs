//! The deployment files under `docker/`, checked without a Docker engine or a cluster: every
//! YAML and JSON file parses; the Dockerfile has its two stages and its dependency layer covers
//! every Cargo target; the compose stack, the Prometheus and Grafana provisioning and the
//! Kubernetes manifests agree with each other on names, paths and port 8080; every `LIVEREC_…`
//! variable they set is a setting liverec accepts; and every metric a dashboard, an alert or a
//! manifest names is one liverec exports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use liverec::config::{BusKind, Config, Overrides, StoreKind};
use serde::Deserialize as _;
use serde_json::Value;

// ---------------------------------------------------------------------------------- reading

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn docker() -> PathBuf {
    repo().join("docker")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every file under `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn has_ext(path: &Path, exts: &[&str]) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.contains(&e))
}

/// The documents of a YAML file, with `<<` merge keys applied (compose uses them), as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    let mut docs = Vec::new();
    for document in yaml_serde::Deserializer::from_str(&text) {
        let mut value = yaml_serde::Value::deserialize(document)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
        value.apply_merge().unwrap_or_else(|e| panic!("{}: bad merge key: {e}", path.display()));
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        docs.push(serde_json::to_value(&value).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    }
    docs
}

fn yaml(path: &Path) -> Value {
    let mut docs = yaml_documents(path);
    assert_eq!(docs.len(), 1, "{} should hold one YAML document", path.display());
    docs.remove(0)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

/// A scalar as the text a container or a process would see (YAML `8` and `"8"` alike).
fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other}"),
    }
}

/// An environment given as a map or as a list of `KEY=VALUE` (both are valid in compose).
fn env_map(value: &Value) -> BTreeMap<String, String> {
    match value {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), scalar_text(v))).collect(),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let text = item.as_str().expect("KEY=VALUE");
                let (k, v) = text.split_once('=').unwrap_or((text, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("unexpected environment {other}"),
    }
}

/// Loads liverec's configuration from exactly these `LIVEREC_…` variables, as the binary would:
/// an unknown key or a bad value is an error here, as it is at start-up.
fn config_from_env(env: &BTreeMap<String, String>, source: &str) -> Config {
    let liverec: Vec<(String, String)> =
        env.iter().filter(|(k, _)| k.starts_with("LIVEREC_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    Config::load_from(None, liverec, &Overrides::default())
        .unwrap_or_else(|e| panic!("{source}: liverec would refuse to start with these settings: {e}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr}"))
}

// ---------------------------------------------------------------------------------- metrics

/// Metric families liverec exports, by name, with their Prometheus type (as declared to
/// OpenTelemetry; each one shows in `/metrics` from its first value).
fn exported_families() -> BTreeMap<String, String> {
    let metrics = liverec::telemetry::Metrics::default();
    let families: BTreeMap<String, String> =
        metrics.families().iter().map(|(name, kind)| (name.to_string(), kind.to_string())).collect();
    assert!(families.len() > 10, "too few metric families declared: {families:?}");
    // The exposition agrees with the declarations for what it shows.
    let text = metrics.render();
    for line in text.lines().filter_map(|line| line.strip_prefix("# TYPE ")) {
        let mut parts = line.split_whitespace();
        let (name, kind) = (parts.next().expect("TYPE name"), parts.next().expect("TYPE kind"));
        assert_eq!(families.get(name).map(String::as_str), Some(kind), "{name} rendered but not declared as {kind}");
    }
    families
}

/// Every `liverec_…` name in `text` (a name starts where the previous character cannot be part
/// of an identifier).
fn liverec_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("liverec_").map(|i| i + from) {
        let boundary = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let end = text[at..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |i| i + at);
        if boundary {
            names.insert(text[at..end].to_owned());
        }
        from = end.max(at + 1);
    }
    names
}

/// What a name used in a query refers to: (family, type), or `None` if liverec exports no such
/// series. Histogram series carry `_bucket`, `_sum` and `_count`; bare histogram names do not exist.
fn resolve<'a>(name: &str, families: &'a BTreeMap<String, String>) -> Option<(&'a str, &'a str)> {
    if let Some((family, kind)) = families.get_key_value(name) {
        return (kind != "histogram").then_some((family.as_str(), kind.as_str()));
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        let (family, kind) = families.get_key_value(base)?;
        (kind == "histogram").then_some((family.as_str(), kind.as_str()))
    })
}

/// Problems with the metrics one PromQL expression (or any text) uses.
fn metric_problems(expr: &str, families: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    for name in liverec_names(expr) {
        if resolve(&name, families).is_none() {
            problems.push(format!("`{name}` is not a series liverec exports"));
        }
    }
    // rate/irate/increase need a counter (or a histogram's _bucket/_sum/_count, which are counters).
    for function in ["rate(", "irate(", "increase("] {
        let mut from = 0;
        while let Some(at) = expr[from..].find(function).map(|i| i + from) {
            from = at + function.len();
            let preceded = at > 0 && expr.as_bytes()[at - 1].is_ascii_alphanumeric();
            if preceded {
                continue; // e.g. `irate(` seen as `rate(`
            }
            let argument = expr[from..].trim_start();
            let name_len = argument.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(argument.len());
            if let Some((family, kind)) = resolve(&argument[..name_len], families) {
                if kind == "gauge" {
                    problems.push(format!("{function}…) over the gauge `{family}`"));
                }
            }
        }
    }
    if expr.contains("histogram_quantile") && !(expr.contains("_bucket") && expr.contains("le")) {
        problems.push("histogram_quantile needs a _bucket series aggregated by `le`".to_owned());
    }
    problems
}

/// Every PromQL expression of a Grafana dashboard (panel targets and templating queries).
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in all_panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push(expr.to_owned());
            }
        }
    }
    for variable in dashboard.pointer("/templating/list").and_then(Value::as_array).into_iter().flatten() {
        if let Some(definition) = variable["definition"].as_str() {
            exprs.push(definition.to_owned());
        }
        if let Some(query) = variable.pointer("/query/query").and_then(Value::as_str) {
            exprs.push(query.to_owned());
        }
    }
    exprs
}

/// Panels at the top level and inside collapsed rows.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("dashboard panels") {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

fn alert_rules(path: &Path) -> Vec<Value> {
    let doc = yaml(path);
    let groups = doc["groups"].as_array().unwrap_or_else(|| panic!("{}: no groups", path.display()));
    groups.iter().flat_map(|g| g["rules"].as_array().expect("rules").iter().cloned()).collect()
}

fn dashboard_files() -> Vec<PathBuf> {
    let files: Vec<PathBuf> =
        files_under(&docker().join("grafana")).into_iter().filter(|p| has_ext(p, &["json"])).collect();
    assert!(!files.is_empty(), "no Grafana dashboard JSON under docker/grafana");
    files
}

// ---------------------------------------------------------------------------------- dockerfile

struct Instruction {
    keyword: String,
    args: String,
}

struct Stage {
    image: String,
    name: String,
    instructions: Vec<Instruction>,
}

/// The Dockerfile's stages, with continuation lines joined, comments dropped and the global
/// `ARG` defaults substituted into `FROM`.
fn dockerfile_stages(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    assert!(current.is_empty(), "the Dockerfile ends inside a continued line");

    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical.into_iter().filter(|l| !l.is_empty()) {
        let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        let rest = rest.trim().to_owned();
        if keyword == "ARG" && stages.is_empty() {
            if let Some((k, v)) = rest.split_once('=') {
                args.insert(k.to_owned(), v.to_owned());
            }
        } else if keyword == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            let mut image = words.first().expect("FROM image").to_string();
            for (k, v) in &args {
                image = image.replace(&format!("${{{k}}}"), v);
            }
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                _ => String::new(),
            };
            stages.push(Stage { image, name, instructions: Vec::new() });
        } else {
            let stage = stages.last_mut().unwrap_or_else(|| panic!("{keyword} before the first FROM"));
            stage.instructions.push(Instruction { keyword, args: rest });
        }
    }
    stages
}

fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("`{args}` should be the JSON exec form: {e}"))
}

/// `.dockerignore` patterns (root-relative, `*` within a name, `**` across names, `!` re-includes).
fn dockerignore() -> Vec<(bool, Vec<String>)> {
    read(&repo().join(".dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (include, pattern) = match l.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, l),
            };
            let parts = pattern.trim_matches('/').split('/').filter(|p| !p.is_empty() && *p != ".");
            (include, parts.map(str::to_owned).collect())
        })
        .collect()
}

fn glob_name(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.starts_with(head)
                && (0..=name.len() - head.len()).any(|skip| {
                    let rest = &name[head.len() + skip..];
                    glob_name(tail, rest)
                })
        }
    }
}

/// Does `pattern` match `path` or one of its parent directories?
fn glob_prefix(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => true, // the pattern matched a parent directory of `path`
        Some((first, rest)) if first == "**" => (0..=path.len()).any(|skip| glob_prefix(rest, &path[skip..])),
        Some((first, rest)) => {
            path.split_first().is_some_and(|(name, tail)| glob_name(first, name) && glob_prefix(rest, tail))
        }
    }
}

fn docker_ignores(patterns: &[(bool, Vec<String>)], path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let mut ignored = false;
    for (include, pattern) in patterns {
        if glob_prefix(pattern, &parts) {
            ignored = !include;
        }
    }
    ignored
}

/// Files the crate embeds at compile time (`include_str!`/`include_bytes!`), relative to the repo.
fn embedded_files() -> Vec<String> {
    let root = repo();
    let mut out = Vec::new();
    for file in files_under(&root.join("src")).into_iter().filter(|p| has_ext(p, &["rs"])) {
        let text = read(&file);
        for macro_name in ["include_str!(\"", "include_bytes!(\""] {
            for piece in text.split(macro_name).skip(1) {
                let relative = piece.split('"').next().expect("path literal");
                let path = file.parent().expect("parent").join(relative);
                let path = std::fs::canonicalize(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let rel = path.strip_prefix(std::fs::canonicalize(&root).expect("root")).expect("inside the repo");
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Source files Cargo insists on when it reads the workspace manifests: the library, the binaries
/// and every declared bench, test or example of each member.
fn cargo_target_files() -> Vec<String> {
    let root_manifest: toml::Value = toml::from_str(&read(&repo().join("Cargo.toml"))).expect("Cargo.toml");
    let members: Vec<String> = root_manifest["workspace"]["members"]
        .as_array()
        .expect("workspace members")
        .iter()
        .map(|m| m.as_str().expect("member").to_owned())
        .collect();
    let mut out = Vec::new();
    for member in members {
        let dir = if member == "." { String::new() } else { format!("{member}/") };
        let manifest: toml::Value = toml::from_str(&read(&repo().join(format!("{dir}Cargo.toml")))).expect("manifest");
        let package = manifest["package"]["name"].as_str().expect("package name");
        // Targets Cargo finds by itself (src/lib.rs, src/main.rs, benches/*.rs) may be absent;
        // declared ones may not.
        if let Some(lib) = manifest.get("lib") {
            let path = lib.get("path").and_then(|p| p.as_str()).unwrap_or("src/lib.rs");
            out.push(format!("{dir}{path}"));
        }
        for (kind, folder) in [("bin", "src/bin"), ("bench", "benches"), ("test", "tests"), ("example", "examples")] {
            for target in manifest.get(kind).and_then(|t| t.as_array()).into_iter().flatten() {
                let name = target["name"].as_str().expect("target name");
                let path = match target.get("path").and_then(|p| p.as_str()) {
                    Some(path) => path.to_owned(),
                    None if kind == "bin" && name == package => "src/main.rs".to_owned(),
                    None => format!("{folder}/{name}.rs"),
                };
                out.push(format!("{dir}{path}"));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------- tests

#[test]
fn every_yaml_and_json_file_under_docker_parses() {
    let files = files_under(&docker());
    let mut yaml_files = 0;
    let mut json_files = 0;
    for file in &files {
        if has_ext(file, &["yaml", "yml"]) {
            assert!(!yaml_documents(file).is_empty(), "{} holds no YAML document", file.display());
            yaml_files += 1;
        } else if has_ext(file, &["json"]) {
            assert!(json(file).is_object(), "{} should be a JSON object", file.display());
            json_files += 1;
        }
    }
    assert!(yaml_files >= 10 && json_files >= 1, "found {yaml_files} YAML and {json_files} JSON files");

    for required in [
        "Dockerfile",
        "compose.yaml",
        "README.md",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "k8s/deployment.yaml",
        "k8s/service.yaml",
        "k8s/hpa.yaml",
        "k8s/pdb.yaml",
        "k8s/configmap.yaml",
        "k8s/kustomization.yaml",
    ] {
        assert!(docker().join(required).is_file(), "docker/{required} is missing");
    }
    for folder in ["grafana/provisioning/datasources", "grafana/provisioning/dashboards"] {
        let found = files_under(&docker().join(folder)).iter().any(|p| has_ext(p, &["yaml", "yml"]));
        assert!(found, "no YAML in docker/{folder}");
    }

    // The README says what each file is for.
    let readme = read(&docker().join("README.md"));
    for file in &files {
        let rel = file.strip_prefix(docker()).expect("under docker/").to_string_lossy().into_owned();
        if rel != "README.md" {
            assert!(readme.contains(&rel), "docker/README.md does not mention {rel}");
        }
    }
    assert!(readme.contains("## Metrics still to come"), "docker/README.md lists no metrics still to come");
}

#[test]
fn dockerfile_builds_in_two_stages_and_runs_as_non_root() {
    let stages = dockerfile_stages(&read(&docker().join("Dockerfile")));
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["builder", "runtime"], "stages");
    let (builder, runtime) = (&stages[0], &stages[1]);
    assert_eq!(builder.image, "rust:1.95-bookworm");
    assert_eq!(runtime.image, "debian:bookworm-slim");

    // Builder: a dependency layer built from manifests and stubs, then the real sources.
    let builds: Vec<usize> = builder
        .instructions
        .iter()
        .enumerate()
        .filter(|(_, i)| i.keyword == "RUN" && i.args.contains("cargo build --release --locked"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(builds.len(), 2, "one cargo build for the dependency layer, one for the sources");
    let copy_all = builder
        .instructions
        .iter()
        .position(|i| i.keyword == "COPY" && i.args == ". .")
        .expect("the builder copies the sources with COPY . .");
    assert!(builds[0] < copy_all && copy_all < builds[1], "the dependency layer must come before COPY . .");
    let dependency_layer = &builder.instructions[..=builds[0]];
    let copied: Vec<&str> = dependency_layer
        .iter()
        .filter(|i| i.keyword == "COPY")
        .flat_map(|i| {
            let words: Vec<&str> = i.args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    for source in &copied {
        assert!(repo().join(source).exists(), "the Dockerfile copies {source}, which does not exist");
    }
    assert!(copied.contains(&"Cargo.lock"), "the dependency layer must be built from the lockfile");
    // Cargo refuses a workspace whose declared targets are missing: each needs a stub or a copy.
    let stubbed = dependency_layer.last().expect("cargo build").args.as_str();
    for target in cargo_target_files() {
        let covered =
            stubbed.contains(&target) || copied.iter().any(|c| target == *c || target.starts_with(&format!("{c}/")));
        assert!(covered, "the dependency layer neither stubs nor copies {target}; `cargo build` would fail there");
    }

    // The build context: what the build needs is sent, the bulky and the private are not.
    let patterns = dockerignore();
    let mut needed: Vec<String> = copied.iter().map(|s| s.to_string()).collect();
    needed.extend(cargo_target_files());
    needed.extend(embedded_files());
    needed.push("config/default.toml".to_owned());
    for path in &needed {
        assert!(!docker_ignores(&patterns, path), ".dockerignore excludes {path}, which the build needs");
    }
    for path in ["target/release/liverec", "data/ml-100k/u.data", "models/x.safetensors", ".git/HEAD"] {
        assert!(docker_ignores(&patterns, path), ".dockerignore should exclude {path}");
    }
    assert!(!docker_ignores(&patterns, "src/models/mod.rs"), ".dockerignore's `models` must not reach src/models");

    // Runtime: the binary from the builder, an unprivileged user, port 8080, /healthz.
    let each = |keyword: &'static str| runtime.instructions.iter().filter(move |i| i.keyword == keyword);
    let copy = each("COPY").find(|i| i.args.contains("--from=builder")).expect("COPY --from=builder");
    assert!(copy.args.contains("liverec"), "the runtime copies the liverec binary: {}", copy.args);
    let user = each("USER").next_back().expect("a USER in the runtime stage").args.clone();
    let uid = user.split(':').next().expect("uid");
    assert!(uid != "root" && uid != "0", "the runtime must not run as root (USER {user})");
    assert!(each("EXPOSE").any(|i| i.args.split_whitespace().any(|p| p == "8080" || p == "8080/tcp")));
    assert!(each("ENV").any(|i| i.args.contains("LIVEREC_LISTEN=0.0.0.0:8080")), "LIVEREC_LISTEN=0.0.0.0:8080");
    let healthcheck = each("HEALTHCHECK").next_back().expect("HEALTHCHECK").args.clone();
    assert!(healthcheck.contains("127.0.0.1:8080/healthz"), "HEALTHCHECK should probe /healthz: {healthcheck}");
    let entrypoint = exec_form(&each("ENTRYPOINT").next_back().expect("ENTRYPOINT").args);
    let cmd = each("CMD").next_back().map(|i| exec_form(&i.args)).unwrap_or_default();
    assert!(entrypoint[0].ends_with("liverec"), "ENTRYPOINT runs liverec: {entrypoint:?}");
    assert_eq!([&entrypoint[1..], &cmd[..]].concat(), ["serve"], "the image runs `liverec serve` by default");
}

struct Compose {
    services: serde_json::Map<String, Value>,
}

impl Compose {
    fn load() -> Self {
        let doc = yaml(&docker().join("compose.yaml"));
        let services = doc["services"].as_object().expect("compose services").clone();
        Compose { services }
    }

    fn liverec_services(&self) -> Vec<(&String, &Value)> {
        let services: Vec<_> =
            self.services.iter().filter(|(_, s)| s["build"]["dockerfile"] == "docker/Dockerfile").collect();
        assert_eq!(services.len(), 2, "two liverec replicas built from docker/Dockerfile");
        services
    }

    /// The host side of each `./host:container` bind mount of a service, by container path.
    fn binds(&self, service: &str) -> BTreeMap<String, PathBuf> {
        self.services[service]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .filter(|v| v.starts_with("./"))
            .map(|v| {
                let mut parts = v.split(':');
                let host = docker().join(parts.next().expect("host"));
                (parts.next().expect("container path").to_owned(), host)
            })
            .collect()
    }
}

#[test]
fn compose_runs_the_full_stack_with_two_production_replicas() {
    let compose = Compose::load();
    for name in ["kafka", "redis", "prometheus", "grafana"] {
        assert!(compose.services.contains_key(name), "compose has no {name} service");
    }
    for (name, service) in &compose.services {
        let image = service["image"].as_str().unwrap_or_else(|| panic!("service {name} names no image"));
        assert!(image.contains(':') && !image.ends_with(":latest"), "{name}: pin the image tag ({image})");
        assert!(service["healthcheck"]["test"].is_array(), "{name} has no healthcheck");
        for dependency in service["depends_on"].as_object().into_iter().flat_map(|d| d.keys()) {
            assert!(compose.services.contains_key(dependency), "{name} depends on unknown {dependency}");
        }
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let volume = volume.as_str().expect("short volume syntax");
            let host = volume.split(':').next().expect("source");
            if host.starts_with('.') {
                assert!(docker().join(host).exists(), "{name} mounts {host}, which is not in docker/");
            }
        }
    }

    // Kafka 4 in KRaft mode, Redis 7 with its append-only file.
    let kafka = &compose.services["kafka"];
    assert!(str_at(kafka, "/image").starts_with("apache/kafka:4."));
    let kafka_env = env_map(&kafka["environment"]);
    assert!(kafka_env["KAFKA_PROCESS_ROLES"].contains("controller"), "Kafka runs its own KRaft controller");
    assert!(!kafka_env.keys().any(|k| k.contains("ZOOKEEPER")), "no ZooKeeper in Kafka 4");
    let advertised = &kafka_env["KAFKA_ADVERTISED_LISTENERS"];
    let redis = &compose.services["redis"];
    assert!(str_at(redis, "/image").starts_with("redis:7"));
    let redis_command: Vec<String> =
        redis["command"].as_array().expect("redis command").iter().map(scalar_text).collect();
    assert!(redis_command.windows(2).any(|w| w == ["--appendonly", "yes"]), "Redis keeps an AOF");

    // Two liverec replicas in production mode: Kafka bus, Redis store, listening on 8080.
    let mut host_ports = BTreeSet::new();
    for (name, service) in compose.liverec_services() {
        assert_eq!(str_at(service, "/build/context"), "..", "{name} builds from the repository root");
        let env = env_map(&service["environment"]);
        let config = config_from_env(&env, &format!("compose service {name}"));
        assert_eq!(config.bus.kind, BusKind::Kafka, "{name}");
        assert_eq!(config.store.kind, StoreKind::Redis, "{name}");
        assert_eq!(config.server.listen.port(), 8080, "{name}");
        assert!(config.server.listen.ip().is_unspecified(), "{name} must listen on all interfaces");
        for broker in config.kafka.brokers.split(',') {
            assert!(advertised.contains(&format!("//{broker}")), "{name}: Kafka does not advertise {broker}");
        }
        let redis_host = config.redis.url.trim_start_matches("redis://").split([':', '/']).next().expect("host");
        assert!(compose.services.contains_key(redis_host), "{name}: no service {redis_host}");
        for dependency in ["kafka", "redis"] {
            assert_eq!(service["depends_on"][dependency]["condition"], "service_healthy", "{name} on {dependency}");
        }
        let ports = service["ports"].as_array().expect("ports");
        for port in ports {
            let port = port.as_str().expect("\"host:container\"");
            assert_eq!(port_of(port), 8080, "{name} publishes container port 8080");
            assert!(
                host_ports.insert(port.split(':').next().expect("host port").to_owned()),
                "{name}: host port taken"
            );
        }
        let health = service["healthcheck"]["test"].to_string();
        assert!(health.contains("127.0.0.1:8080/"), "{name}: healthcheck should probe port 8080: {health}");
    }

    // Grafana reads the provisioning and the dashboards from the folders in docker/grafana.
    let grafana_binds = compose.binds("grafana");
    assert_eq!(grafana_binds.get("/etc/grafana/provisioning"), Some(&docker().join("./grafana/provisioning")));
    let grafana_env = env_map(&compose.services["grafana"]["environment"]);
    let home = &grafana_env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"];
    let home_on_host = grafana_binds
        .iter()
        .find_map(|(container, host)| home.strip_prefix(&format!("{container}/")).map(|rest| host.join(rest)))
        .unwrap_or_else(|| panic!("the home dashboard {home} is not in a mounted folder"));
    assert!(home_on_host.is_file(), "{} does not exist", home_on_host.display());
    for provider in files_under(&docker().join("grafana/provisioning/dashboards")) {
        for entry in yaml(&provider)["providers"].as_array().expect("providers") {
            let path = str_at(entry, "/options/path");
            let host = grafana_binds.get(path).unwrap_or_else(|| panic!("dashboard path {path} is not mounted"));
            assert!(files_under(host).iter().any(|f| has_ext(f, &["json"])), "no dashboard in {}", host.display());
        }
    }
    assert!(compose.binds("prometheus").contains_key("/etc/prometheus"), "Prometheus mounts its config");
}

#[test]
fn prometheus_scrapes_both_replicas_and_loads_the_rules() {
    let compose = Compose::load();
    let config = yaml(&docker().join("prometheus/prometheus.yml"));
    let jobs = config["scrape_configs"].as_array().expect("scrape_configs");
    let liverec = jobs.iter().find(|j| j["job_name"] == "liverec").expect("a liverec scrape job");
    assert_eq!(liverec["metrics_path"].as_str().unwrap_or("/metrics"), "/metrics");
    let targets: BTreeSet<String> = liverec["static_configs"]
        .as_array()
        .expect("static_configs")
        .iter()
        .flat_map(|c| c["targets"].as_array().expect("targets").iter().map(scalar_text))
        .collect();
    let replicas: BTreeSet<String> =
        compose.liverec_services().iter().map(|(name, _)| format!("{name}:8080")).collect();
    assert_eq!(targets, replicas, "Prometheus scrapes every liverec replica on 8080");
    for rule_file in config["rule_files"].as_array().expect("rule_files") {
        let path = docker().join("prometheus").join(rule_file.as_str().expect("rule file"));
        assert!(!alert_rules(&path).is_empty(), "{} has no rules", path.display());
    }

    // Every alert has a promtool unit test (`promtool test rules docker/prometheus/alerts.test.yml`).
    let unit_tests = yaml(&docker().join("prometheus/alerts.test.yml"));
    let tested: BTreeSet<String> = unit_tests["tests"]
        .as_array()
        .expect("promtool tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .map(|case| str_at(case, "/alertname").to_owned())
        .collect();
    for rule in alert_rules(&docker().join("prometheus/alerts.yml")) {
        let name = rule["alert"].as_str().expect("alert name");
        assert!(tested.contains(name), "alert {name} has no case in docker/prometheus/alerts.test.yml");
    }
}

#[test]
fn grafana_dashboard_uses_the_provisioned_data_source() {
    let mut uids = BTreeSet::new();
    for file in files_under(&docker().join("grafana/provisioning/datasources")) {
        for source in yaml(&file)["datasources"].as_array().expect("datasources") {
            assert_eq!(source["type"], "prometheus");
            assert_eq!(str_at(source, "/url"), "http://prometheus:9090", "the compose Prometheus");
            uids.insert(str_at(source, "/uid").to_owned());
        }
    }
    for file in dashboard_files() {
        let dashboard = json(&file);
        assert!(dashboard["uid"].is_string() && dashboard["title"].is_string(), "{}", file.display());
        let mut ids = BTreeSet::new();
        for panel in all_panels(&dashboard) {
            let title = panel["title"].as_str().unwrap_or("?");
            assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "{}: duplicate id ({title})", file.display());
            let grid = &panel["gridPos"];
            let right = grid["x"].as_u64().expect("x") + grid["w"].as_u64().expect("w");
            assert!(right <= 24 && grid["h"].as_u64().is_some_and(|h| h > 0), "{title}: gridPos {grid}");
            if panel["type"] == "row" {
                continue;
            }
            let targets = panel["targets"].as_array().filter(|t| !t.is_empty());
            let targets = targets.unwrap_or_else(|| panic!("{title}: no query"));
            for source in std::iter::once(&panel["datasource"]).chain(targets.iter().map(|t| &t["datasource"])) {
                let uid = str_at(source, "/uid");
                assert!(uids.contains(uid), "{title}: data source {uid} is not provisioned ({uids:?})");
            }
        }
    }
}

#[test]
fn dashboards_and_alerts_use_only_metrics_liverec_exports() {
    let families = exported_families();

    // The check itself catches a made-up name, a gauge under rate() and a bare histogram name.
    assert!(!metric_problems("sum(rate(liverec_made_up_total[1m]))", &families).is_empty());
    assert!(!metric_problems("rate(liverec_sessions_active[1m])", &families).is_empty());
    assert!(!metric_problems("liverec_event_to_push_seconds > 1", &families).is_empty());
    let fine = "histogram_quantile(0.99, sum by (le) (rate(liverec_event_to_push_seconds_bucket[5m])))";
    assert_eq!(metric_problems(fine, &families), Vec::<String>::new());

    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for file in dashboard_files() {
        for expr in dashboard_exprs(&json(&file)) {
            for problem in metric_problems(&expr, &families) {
                problems.push(format!("{}: {problem} in `{expr}`", file.display()));
            }
            used.extend(liverec_names(&expr).iter().filter_map(|n| resolve(n, &families)).map(|(f, _)| f.to_owned()));
        }
    }
    let rules = alert_rules(&docker().join("prometheus/alerts.yml"));
    for rule in &rules {
        let name = rule["alert"].as_str().or(rule["record"].as_str()).expect("alert or record name");
        let expr = scalar_text(&rule["expr"]);
        for problem in metric_problems(&expr, &families) {
            problems.push(format!("alert {name}: {problem}"));
        }
        assert!(rule["annotations"]["summary"].is_string() || rule["record"].is_string(), "{name}: no summary");
    }
    // Any other file under docker/ (manifests, provisioning) may only name exported series too.
    for file in files_under(&docker()).into_iter().filter(|p| has_ext(p, &["yaml", "yml", "json"])) {
        for name in liverec_names(&read(&file)) {
            if resolve(&name, &families).is_none() {
                problems.push(format!("{}: `{name}` is not a series liverec exports", file.display()));
            }
        }
    }
    assert!(problems.is_empty(), "metrics that liverec does not export (or misused):\n{}", problems.join("\n"));

    // The dashboard shows what issue 6 asks for, as far as liverec exports it today.
    for family in [
        "liverec_ingest_events_total",
        "liverec_event_to_push_seconds",
        "liverec_model_batch_size",
        "liverec_model_inference_seconds",
        "liverec_sessions_active",
        "liverec_sessions_started_total",
        "liverec_sessions_evicted_total",
        "liverec_stream_subscribers",
        "liverec_push_sent_total",
        "liverec_push_dropped_stale_total",
        "liverec_store_errors_total",
        "liverec_store_write_seconds",
        "liverec_store_load_seconds",
        "liverec_kafka_records_total",
        "liverec_kafka_dead_letters_total",
        "liverec_kafka_rebalances_total",
        "liverec_kafka_pauses_total",
        "liverec_kafka_consumer_restarts_total",
    ] {
        assert!(used.contains(family), "the dashboard does not show {family}");
    }
    let unused: Vec<&String> = families.keys().filter(|f| !used.contains(*f)).collect();
    if !unused.is_empty() {
        eprintln!("exported but not on the dashboard: {unused:?}");
    }
    assert!(rules.len() >= 5, "a few useful alert rules");
}

/// The Kubernetes objects of docker/k8s, by kind.
fn k8s_objects() -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    for file in files_under(&docker().join("k8s")).into_iter().filter(|p| has_ext(p, &["yaml", "yml"])) {
        for doc in yaml_documents(&file) {
            let kind = str_at(&doc, "/kind").to_owned();
            assert!(doc["apiVersion"].is_string(), "{}: {kind} has no apiVersion", file.display());
            assert!(objects.insert(kind.clone(), doc).is_none(), "two {kind} objects");
        }
    }
    objects
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("matchLabels");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn kubernetes_manifests_hang_together() {
    let objects = k8s_objects();
    let api = |kind: &str| {
        let object = objects.get(kind).unwrap_or_else(|| panic!("no {kind} in docker/k8s"));
        str_at(object, "/apiVersion").to_owned()
    };
    assert_eq!(api("Deployment"), "apps/v1");
    assert_eq!(api("Service"), "v1");
    assert_eq!(api("ConfigMap"), "v1");
    assert_eq!(api("HorizontalPodAutoscaler"), "autoscaling/v2");
    assert_eq!(api("PodDisruptionBudget"), "policy/v1");

    // Kustomize lists every manifest.
    let kustomization = &objects["Kustomization"];
    let listed: BTreeSet<String> =
        kustomization["resources"].as_array().expect("resources").iter().map(scalar_text).collect();
    let present: BTreeSet<String> = files_under(&docker().join("k8s"))
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml resources");

    let deployment = &objects["Deployment"];
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(labels_match(&deployment["spec"]["selector"]["matchLabels"], pod_labels), "Deployment selector");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    assert!(str_at(container, "/image").starts_with("liverec:"), "the container runs the liverec image");
    let ports = container["ports"].as_array().expect("container ports");
    let http = ports.iter().find(|p| p["containerPort"] == 8080).expect("containerPort 8080");
    let port_name = str_at(http, "/name");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(get["port"] == port_name || get["port"] == 8080, "{probe} port {}", get["port"]);
    }
    for resource in ["cpu", "memory"] {
        assert!(container["resources"]["requests"][resource].is_string(), "resources.requests.{resource}");
    }
    assert!(container["resources"]["limits"]["memory"].is_string(), "resources.limits.memory");

    // Runs as the image's unprivileged user.
    let stages = dockerfile_stages(&read(&docker().join("Dockerfile")));
    let image_user = stages[1].instructions.iter().rev().find(|i| i.keyword == "USER").expect("USER").args.clone();
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(scalar_text(&pod["securityContext"]["runAsUser"]), image_user.split(':').next().expect("uid"));

    // Settings come from the ConfigMap, and liverec accepts them.
    let config_map = &objects["ConfigMap"];
    let env_from = container["envFrom"].as_array().expect("envFrom");
    assert!(
        env_from.iter().any(|e| e["configMapRef"]["name"] == config_map["metadata"]["name"]),
        "envFrom the ConfigMap"
    );
    let config = config_from_env(&env_map(&config_map["data"]), "k8s ConfigMap");
    assert_eq!(config.server.listen.port(), 8080);
    assert!(config.server.listen.ip().is_unspecified(), "listen on all interfaces in a pod");
    assert_eq!(config.bus.kind, BusKind::Kafka);
    assert_eq!(config.store.kind, StoreKind::Redis);

    // The Service reaches the pods' port 8080.
    let service = &objects["Service"];
    assert!(labels_match(&service["spec"]["selector"], pod_labels), "Service selector");
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(service_port["port"], 8080);
    assert!(service_port["targetPort"] == port_name || service_port["targetPort"] == 8080);

    // The HPA scales this Deployment on CPU and on consumer lag, within the partition count.
    let hpa = &objects["HorizontalPodAutoscaler"];
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
    let min = hpa["spec"]["minReplicas"].as_i64().expect("minReplicas");
    let max = hpa["spec"]["maxReplicas"].as_i64().expect("maxReplicas");
    assert!(min >= 2 && min <= max, "minReplicas {min}, maxReplicas {max}");
    assert!(
        max <= i64::from(config.kafka.partitions),
        "replicas beyond the {} partitions sit idle",
        config.kafka.partitions
    );
    let metrics = hpa["spec"]["metrics"].as_array().expect("HPA metrics");
    assert!(metrics.iter().any(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu"), "HPA on CPU");
    let lag = metrics
        .iter()
        .find_map(|m| match m["type"].as_str() {
            Some("External") => m["external"]["metric"]["name"].as_str(),
            Some("Pods") => m["pods"]["metric"]["name"].as_str(),
            _ => None,
        })
        .expect("an External or Pods metric for consumer lag");
    assert!(lag.contains("lag"), "the second HPA metric should be consumer lag, got {lag}");

    // The PodDisruptionBudget covers the same pods and keeps one.
    let pdb = &objects["PodDisruptionBudget"];
    assert!(labels_match(&pdb["spec"]["selector"]["matchLabels"], pod_labels), "PDB selector");
    assert!(pdb["spec"]["minAvailable"].as_i64().is_some_and(|n| n >= 1) || pdb["spec"]["maxUnavailable"].is_number());
}
