//! The paired deployment (docker-compose.yml, Prometheus, Grafana), proven
//! without a Docker engine:
//!
//! - `compose_refers_only_to_things_that_exist`: every file, directory,
//!   script, profile, variable, service and command-line flag that
//!   docker-compose.yml (and the Dockerfile, the Prometheus and Grafana
//!   configuration, docs/deployment.md) refers to exists.
//! - `dashboard_queries_use_only_metrics_from_src_metrics_rs`: every PromQL
//!   expression of grafana/dashboards/meridian.json names only metrics that
//!   src/metrics.rs defines, with the right labels, and every metric is shown.
//! - `dashboard_queries_return_series_from_a_live_demo`: a real Prometheus
//!   scrapes a live `meridian demo --keep` and every dashboard expression is
//!   evaluated through its HTTP API; each must be valid and return series.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value as J;
use serde_yaml::Value as Y;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn fail_if_any(what: &str, errors: &[String]) {
    if !errors.is_empty() {
        panic!(
            "{what}: {} problem(s):\n  - {}",
            errors.len(),
            errors.join("\n  - ")
        );
    }
}

// ---------------------------------------------------------------- compose

const PROFILES: &[&str] = &["monitor", "workload", "sql"];

/// service → profile it must have (None: started by a plain `docker compose up`).
const EXPECTED_SERVICES: &[(&str, Option<&str>)] = &[
    ("east", None),
    ("west", None),
    ("east_init", None),
    ("west_init", None),
    ("east_west", None),
    ("west_east", None),
    ("changefeed_east", None),
    ("changefeed_west", None),
    ("prometheus", Some("monitor")),
    ("grafana", Some("monitor")),
    ("east_workload", Some("workload")),
    ("west_workload", Some("workload")),
    ("concurrent_workloads", Some("workload")),
    ("east_sql", Some("sql")),
    ("west_sql", Some("sql")),
];

/// The meridian services: (service, subcommand, region label, metrics port).
const MERIDIAN_SERVICES: &[(&str, &str, &str)] = &[
    ("east_west", "start", "west"),
    ("west_east", "start", "east"),
    ("changefeed_east", "changefeed", "east"),
    ("changefeed_west", "changefeed", "west"),
];

fn parse_dotenv(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Every `${X}`, `${X:-d}`, `$X` in a compose string (after `$$` escapes).
/// Returns (name, has_default).
fn interpolations(s: &str) -> Vec<(String, bool)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'$' {
            i += 1;
            continue;
        }
        if i + 1 < b.len() && b[i + 1] == b'$' {
            i += 2;
            continue;
        }
        if i + 1 < b.len() && b[i + 1] == b'{' {
            let end = s[i..].find('}').map(|e| i + e).unwrap_or(b.len());
            let inner = &s[i + 2..end];
            let name: String = inner
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let rest = &inner[name.len()..];
            let has_default = rest.starts_with(":-") || rest.starts_with('-');
            out.push((name, has_default));
            i = end + 1;
            continue;
        }
        let name: String = s[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push((name.clone(), false));
        }
        i += 1 + name.len();
    }
    out
}

/// Replaces compose interpolations with .env values or defaults; `$$` → `$`.
fn interpolate(
    s: &str,
    env: &BTreeMap<String, String>,
    overrides: &BTreeMap<&str, &str>,
) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(p) = rest.find('$') {
        out.push_str(&rest[..p]);
        let r = &rest[p..];
        if let Some(after) = r.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if r.starts_with("${") {
            let end = r.find('}').expect("closed ${");
            let inner = &r[2..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let v = overrides
                .get(name)
                .map(|s| s.to_string())
                .or_else(|| env.get(name).filter(|v| !v.is_empty()).cloned())
                .or_else(|| default.map(str::to_string))
                .unwrap_or_default();
            out.push_str(&v);
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = &r[1..];
        }
    }
    out.push_str(rest);
    out
}

fn all_strings(v: &Y, out: &mut Vec<String>) {
    match v {
        Y::String(s) => out.push(s.clone()),
        Y::Sequence(seq) => seq.iter().for_each(|x| all_strings(x, out)),
        Y::Mapping(m) => m.iter().for_each(|(k, x)| {
            all_strings(k, out);
            all_strings(x, out)
        }),
        Y::Tagged(t) => all_strings(&t.value, out),
        _ => {}
    }
}

fn ystr<'a>(v: &'a Y, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Y::as_str)
}

/// A compose `command` as an argv (string form is split on whitespace; none of
/// ours quotes).
fn argv(v: &Y) -> Vec<String> {
    match v {
        Y::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Y::Sequence(seq) => seq
            .iter()
            .filter_map(Y::as_str)
            .map(str::to_string)
            .collect(),
        _ => vec![],
    }
}

fn depends_on(svc: &Y) -> Vec<(String, Option<String>)> {
    match svc.get("depends_on") {
        Some(Y::Sequence(s)) => s
            .iter()
            .filter_map(Y::as_str)
            .map(|d| (d.to_string(), None))
            .collect(),
        Some(Y::Mapping(m)) => m
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap_or_default().to_string(),
                    ystr(v, "condition").map(str::to_string),
                )
            })
            .collect(),
        _ => vec![],
    }
}

fn profiles(svc: &Y) -> Vec<String> {
    svc.get("profiles")
        .and_then(Y::as_sequence)
        .map(|s| s.iter().filter_map(Y::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// Bind mounts of a service: (container path, host path relative to the repo).
fn binds(
    name: &str,
    svc: &Y,
    named_volumes: &BTreeSet<String>,
    errors: &mut Vec<String>,
) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for v in svc
        .get("volumes")
        .and_then(Y::as_sequence)
        .into_iter()
        .flatten()
    {
        let (source, target, kind) = match v {
            Y::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                if parts.len() < 2 {
                    errors.push(format!("{name}: anonymous volume {s:?}"));
                    continue;
                }
                let kind = if parts[0].starts_with('.')
                    || parts[0].starts_with('/')
                    || parts[0].starts_with('~')
                {
                    "bind"
                } else {
                    "volume"
                };
                (parts[0].to_string(), parts[1].to_string(), kind.to_string())
            }
            Y::Mapping(_) => (
                ystr(v, "source").unwrap_or_default().to_string(),
                ystr(v, "target").unwrap_or_default().to_string(),
                ystr(v, "type").unwrap_or("volume").to_string(),
            ),
            _ => continue,
        };
        if kind == "bind" {
            if !source.starts_with('.') {
                errors.push(format!(
                    "{name}: bind mount {source:?} is not relative to the compose file"
                ));
                continue;
            }
            let host = root().join(&source);
            if !host.exists() {
                errors.push(format!("{name}: bind-mounted {source} does not exist"));
            }
            out.push((target, PathBuf::from(source)));
        } else if !named_volumes.contains(&source) {
            errors.push(format!(
                "{name}: volume {source:?} is not declared under top-level volumes"
            ));
        }
    }
    out
}

/// Container paths a string refers to (`/sql/x.sql`, `--config.file=/etc/…`).
fn container_paths(s: &str) -> Vec<String> {
    s.split(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '=' || c == ',')
        .filter(|t| t.starts_with('/') && t.len() > 1)
        .map(|t| t.trim_end_matches([';', ')']).to_string())
        .collect()
}

fn metrics_port(args: &[String]) -> Option<u16> {
    let i = args.iter().position(|a| a == "--metricsAddr")?;
    args.get(i + 1)?.rsplit(':').next()?.parse().ok()
}

#[test]
fn compose_refers_only_to_things_that_exist() {
    let text = read("docker-compose.yml");
    let compose: Y = serde_yaml::from_str(&text).expect("docker-compose.yml is YAML");
    let env = parse_dotenv(&read(".env"));
    let mut errors = Vec::new();

    let services = compose
        .get("services")
        .and_then(Y::as_mapping)
        .expect("services:")
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
        .collect::<BTreeMap<_, _>>();
    let named_volumes: BTreeSet<String> = compose
        .get("volumes")
        .and_then(Y::as_mapping)
        .map(|m| m.keys().filter_map(Y::as_str).map(str::to_string).collect())
        .unwrap_or_default();

    // Variables: every interpolation is set in .env or has a default; every
    // .env setting is used; the documented knobs exist.
    let mut strings = Vec::new();
    all_strings(&compose, &mut strings);
    let mut used_vars = BTreeSet::new();
    for s in &strings {
        for (var, has_default) in interpolations(s) {
            if !has_default && !env.contains_key(&var) {
                errors.push(format!(
                    "variable ${{{var}}} has no default and is not set in .env"
                ));
            }
            used_vars.insert(var);
        }
    }
    for k in env.keys() {
        if !used_vars.contains(k) {
            errors.push(format!(
                ".env sets {k}, which docker-compose.yml never uses"
            ));
        }
    }
    for k in [
        "CDC_ARGS",
        "START_EAST",
        "START_WEST",
        "DURATION",
        "RATE",
        "GRAFANA_ADMIN_PASSWORD",
    ] {
        if !env.contains_key(k) {
            errors.push(format!(".env does not set {k}"));
        }
        if !used_vars.contains(k) {
            errors.push(format!("docker-compose.yml does not use {k}"));
        }
    }

    // Services and profiles.
    for (name, profile) in EXPECTED_SERVICES {
        match services.get(*name) {
            None => errors.push(format!("service {name} is missing")),
            Some(svc) => {
                let p = profiles(svc);
                let want: Vec<String> = profile.iter().map(|s| s.to_string()).collect();
                if p != want {
                    errors.push(format!(
                        "service {name} has profiles {p:?}, expected {want:?}"
                    ));
                }
            }
        }
    }
    let mut used_profiles = BTreeSet::new();
    let mut built_images = BTreeSet::new();
    for (name, svc) in &services {
        for p in profiles(svc) {
            if !PROFILES.contains(&p.as_str()) {
                errors.push(format!("{name}: unknown profile {p:?}"));
            }
            used_profiles.insert(p);
        }
        if let Some(b) = svc.get("build") {
            let (ctx, dockerfile) = match b {
                Y::String(s) => (s.as_str(), "Dockerfile"),
                _ => (
                    ystr(b, "context").unwrap_or("."),
                    ystr(b, "dockerfile").unwrap_or("Dockerfile"),
                ),
            };
            let ctx_path = root().join(ctx);
            if !ctx_path.is_dir() {
                errors.push(format!("{name}: build context {ctx} is not a directory"));
            }
            if !ctx_path.join(dockerfile).is_file() {
                errors.push(format!(
                    "{name}: Dockerfile {ctx}/{dockerfile} does not exist"
                ));
            }
            if let Some(img) = ystr(svc, "image") {
                built_images.insert(img.to_string());
            }
        }
    }
    for (name, svc) in &services {
        if svc.get("build").is_none() {
            match ystr(svc, "image") {
                None => errors.push(format!("{name}: neither image nor build")),
                Some(img) if img.starts_with("meridian") && !built_images.contains(img) => {
                    errors.push(format!("{name}: image {img} is built by no service"))
                }
                _ => {}
            }
        }
    }
    for p in PROFILES {
        if !used_profiles.contains(*p) {
            errors.push(format!("profile {p} has no service"));
        }
    }

    // Dependencies.
    for (name, svc) in &services {
        for (dep, cond) in depends_on(svc) {
            let Some(d) = services.get(&dep) else {
                errors.push(format!("{name} depends on {dep}, which is not a service"));
                continue;
            };
            if profiles(svc).is_empty() && !profiles(d).is_empty() {
                errors.push(format!(
                    "{name} (no profile) depends on {dep}, which only starts with a profile"
                ));
            }
            match cond.as_deref() {
                None | Some("service_started") | Some("service_completed_successfully") => {}
                Some("service_healthy") => {
                    if d.get("healthcheck").is_none() {
                        errors.push(format!(
                            "{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                        ));
                    }
                }
                Some(c) => errors.push(format!("{name}: unknown depends_on condition {c:?}")),
            }
        }
    }

    // Files: env_file, bind mounts, and every container path a command,
    // health check or environment value names must come from a bind mount.
    for (name, svc) in &services {
        match svc.get("env_file") {
            Some(Y::String(f)) if !root().join(f).is_file() => {
                errors.push(format!("{name}: env_file {f} does not exist"))
            }
            Some(Y::Sequence(fs)) => {
                for f in fs {
                    let p = f.as_str().or_else(|| ystr(f, "path")).unwrap_or_default();
                    if !root().join(p).is_file() {
                        errors.push(format!("{name}: env_file {p} does not exist"));
                    }
                }
            }
            _ => {}
        }
        let binds = binds(name, svc, &named_volumes, &mut errors);
        let mut refs = Vec::new();
        for key in ["command", "entrypoint", "healthcheck", "environment"] {
            if let Some(v) = svc.get(key) {
                all_strings(v, &mut refs);
            }
        }
        for s in refs {
            for path in container_paths(&s) {
                for (target, host) in &binds {
                    let target = target.trim_end_matches('/');
                    if let Some(rest) = path.strip_prefix(target) {
                        if rest.is_empty() || rest.starts_with('/') {
                            let rel = rest.trim_start_matches('/');
                            let h = if rel.is_empty() {
                                root().join(host)
                            } else {
                                root().join(host).join(rel)
                            };
                            if !h.exists() {
                                errors.push(format!(
                                    "{name}: {path} is {} on the host, which does not exist",
                                    host.join(rest.trim_start_matches('/')).display()
                                ));
                            }
                        }
                    }
                }
            }
        }
    }

    // Clusters: logical decoding and health checks.
    for name in ["east", "west"] {
        if let Some(svc) = services.get(name) {
            if !argv(svc.get("command").unwrap_or(&Y::Null))
                .iter()
                .any(|a| a == "wal_level=logical")
            {
                errors.push(format!("{name}: command does not set wal_level=logical"));
            }
            if svc.get("healthcheck").is_none() {
                errors.push(format!("{name}: no healthcheck"));
            }
        }
    }

    // The meridian commands parse with meridian's own command line, with and
    // without CDC_ARGS, and the receivers pass CDC_ARGS through.
    let mut metrics_ports = BTreeMap::new();
    for (name, sub, _) in MERIDIAN_SERVICES {
        let Some(svc) = services.get(*name) else {
            continue;
        };
        let raw = svc.get("command").cloned().unwrap_or(Y::Null);
        let raw_text = argv(&raw).join(" ");
        if *sub == "start" && !raw_text.contains("CDC_ARGS") {
            errors.push(format!(
                "{name}: command does not pass ${{CDC_ARGS}} through"
            ));
        }
        let variants: &[&str] = if *sub == "start" {
            &["", "--bestEffortOnly"]
        } else {
            &[""]
        };
        for cdc_args in variants.iter().copied() {
            let mut over = BTreeMap::new();
            over.insert("CDC_ARGS", cdc_args);
            let args: Vec<String> = interpolate(&raw_text, &env, &over)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            if args.first().map(String::as_str) != Some(*sub) {
                errors.push(format!("{name}: command should start with {sub}: {args:?}"));
            }
            let mut full = vec!["meridian".to_string()];
            full.extend(args.iter().cloned());
            if let Err(e) = meridian::cli::Cli::try_parse_from(&full) {
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                errors.push(format!(
                    "{name}: `meridian {}` does not parse (CDC_ARGS={cdc_args:?}): {first}",
                    args.join(" ")
                ));
            }
            if let Some(p) = metrics_port(&args) {
                metrics_ports.insert(name.to_string(), p);
            }
        }
        if !metrics_ports.contains_key(*name) {
            errors.push(format!(
                "{name}: no --metricsAddr, so Prometheus cannot scrape it"
            ));
        }
    }

    // Dockerfile: COPY sources exist and are not excluded from the context.
    let ignore: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    for line in read("Dockerfile").lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        if rest.contains("--from=") {
            continue;
        }
        let parts: Vec<&str> = rest
            .split_whitespace()
            .filter(|p| !p.starts_with("--"))
            .collect();
        for src in &parts[..parts.len().saturating_sub(1)] {
            let src = src.trim_end_matches('/');
            if src != "." && !root().join(src).exists() {
                errors.push(format!("Dockerfile: COPY {src} does not exist"));
            }
            let first = src.split('/').next().unwrap_or_default();
            if src != "." && ignore.iter().any(|i| i == first) {
                errors.push(format!(
                    "Dockerfile: COPY {src}, but .dockerignore excludes it"
                ));
            }
        }
    }
    for needed in ["src", "Cargo.toml", "Cargo.lock", "userscripts"] {
        if ignore.iter().any(|i| i == needed) {
            errors.push(format!(
                ".dockerignore excludes {needed}, which the build needs"
            ));
        }
    }

    // Prometheus: one target per meridian service, on its metrics port, with
    // static region/component labels.
    let prom: Y =
        serde_yaml::from_str(&read("prometheus/prometheus.yml")).expect("prometheus.yml is YAML");
    let mut scraped = BTreeSet::new();
    for job in prom
        .get("scrape_configs")
        .and_then(Y::as_sequence)
        .into_iter()
        .flatten()
    {
        for sc in job
            .get("static_configs")
            .and_then(Y::as_sequence)
            .into_iter()
            .flatten()
        {
            let labels = sc.get("labels");
            for t in sc
                .get("targets")
                .and_then(Y::as_sequence)
                .into_iter()
                .flatten()
            {
                let t = t.as_str().unwrap_or_default();
                let (host, port) = t.rsplit_once(':').unwrap_or((t, ""));
                if host == "localhost" {
                    continue;
                }
                let Some((_, _, region)) = MERIDIAN_SERVICES.iter().find(|(n, _, _)| *n == host)
                else {
                    errors.push(format!(
                        "prometheus.yml: target {t} is not a meridian service"
                    ));
                    continue;
                };
                scraped.insert(host.to_string());
                if metrics_ports.get(host).map(|p| p.to_string()) != Some(port.to_string()) {
                    errors.push(format!(
                        "prometheus.yml: target {t}, but {host} serves metrics on {:?}",
                        metrics_ports.get(host)
                    ));
                }
                let l = |k: &str| {
                    labels
                        .and_then(|l| ystr(l, k))
                        .unwrap_or_default()
                        .to_string()
                };
                if l("region") != *region || l("component") != host {
                    errors.push(format!(
                        "prometheus.yml: target {t} should have region={region}, component={host}; has region={:?}, component={:?}",
                        l("region"),
                        l("component")
                    ));
                }
            }
        }
    }
    for (n, _, _) in MERIDIAN_SERVICES {
        if !scraped.contains(*n) {
            errors.push(format!("prometheus.yml does not scrape {n}"));
        }
    }

    // Grafana: the data source uid the dashboard uses is provisioned; the
    // dashboard provider reads the directory compose mounts the dashboard in.
    let ds: Y =
        serde_yaml::from_str(&read("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    let ds_uids: BTreeSet<String> = ds
        .get("datasources")
        .and_then(Y::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|d| ystr(d, "uid").map(str::to_string))
        .collect();
    let dash: J = serde_json::from_str(&read("grafana/dashboards/meridian.json")).unwrap();
    let mut dash_uids = BTreeSet::new();
    collect_datasource_uids(&dash, &mut dash_uids);
    for u in dash_uids.difference(&ds_uids) {
        errors.push(format!(
            "dashboard uses data source uid {u:?}, which is not provisioned"
        ));
    }
    let prov: Y =
        serde_yaml::from_str(&read("grafana/provisioning/dashboards/meridian.yml")).unwrap();
    if let Some(grafana) = services.get("grafana") {
        let mut e2 = Vec::new();
        let gb = binds("grafana", grafana, &named_volumes, &mut e2);
        for p in prov
            .get("providers")
            .and_then(Y::as_sequence)
            .into_iter()
            .flatten()
        {
            let path = p
                .get("options")
                .and_then(|o| ystr(o, "path"))
                .unwrap_or_default();
            match gb.iter().find(|(t, _)| t == path) {
                Some((_, host)) if root().join(host).join("meridian.json").is_file() => {}
                _ => errors.push(format!(
                    "grafana dashboard provider reads {path}, where compose mounts no directory holding meridian.json"
                )),
            }
        }
    }

    // docs/deployment.md: the services, ports and profiles it names exist.
    let docs = read("docs/deployment.md");
    for line in docs.lines().filter(|l| l.contains("docker compose")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            if *w == "--profile" {
                if let Some(p) = words.get(i + 1) {
                    if !PROFILES.contains(p) {
                        errors.push(format!(
                            "docs/deployment.md: unknown profile {p} in `{line}`"
                        ));
                    }
                }
            }
            if *w == "run" || *w == "port" {
                let rest: Vec<&&str> = words[i + 1..]
                    .iter()
                    .filter(|w| !w.starts_with('-'))
                    .collect();
                if let Some(s) = rest.first() {
                    let s = s.trim_matches('`');
                    if !services.contains_key(s) {
                        errors.push(format!(
                            "docs/deployment.md: `{line}` names service {s}, which does not exist"
                        ));
                    }
                }
            }
        }
    }
    for needle in [
        "docker compose port grafana 3000",
        "/d/meridian",
        "cdc_sink_dlq",
        "CDC_ARGS",
    ] {
        if !docs.contains(needle) {
            errors.push(format!("docs/deployment.md does not mention {needle}"));
        }
    }

    fail_if_any("docker-compose.yml and friends", &errors);
}

fn collect_datasource_uids(v: &J, out: &mut BTreeSet<String>) {
    match v {
        J::Object(m) => {
            if let Some(J::Object(ds)) = m.get("datasource") {
                if let Some(J::String(u)) = ds.get("uid") {
                    out.insert(u.clone());
                }
            }
            m.values().for_each(|x| collect_datasource_uids(x, out));
        }
        J::Array(a) => a.iter().for_each(|x| collect_datasource_uids(x, out)),
        _ => {}
    }
}

// ------------------------------------------------------------- dashboard

#[derive(Debug, Clone)]
struct MetricDef {
    histogram: bool,
    labels: Vec<String>,
}

/// Metric names, kinds and labels as src/metrics.rs registers them, read from
/// its source text: the first string literal of `counter_vec(&r, …)`,
/// `histogram_vec(&r, …)`, `gauge(&r, …)`, `…::new("…"` and `Opts::new("…"`.
fn metrics_from_source() -> BTreeMap<String, MetricDef> {
    let src = read("src/metrics.rs");
    let b = src.as_bytes();
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < b.len() {
        // skip comments
        if src[i..].starts_with("//") {
            i += src[i..].find('\n').unwrap_or(src.len() - i);
            continue;
        }
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        let end = i + 1 + src[i + 1..].find('"').expect("closed string");
        let lit = &src[i + 1..end];
        let before = src[..i].trim_end();
        let (is_name, histogram, outer) = if let Some(b2) = before.strip_suffix("&r,") {
            let b2 = b2.trim_end();
            (
                b2.ends_with("counter_vec(")
                    || b2.ends_with("histogram_vec(")
                    || b2.ends_with("gauge("),
                b2.ends_with("histogram_vec("),
                false,
            )
        } else if before.ends_with("::new(") {
            (
                true,
                before.ends_with("HistogramOpts::new("),
                before.ends_with("Opts::new("),
            )
        } else {
            (false, false, false)
        };
        if is_name
            && lit
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            // The call's text (and, for `Opts::new`, the enclosing call's):
            // its label list is `TABLE` or `&["a", "b"]`.
            let mut depth = 1i32;
            let mut j = end + 1;
            let mut span_end = None;
            while j < b.len() {
                match b[j] {
                    b'"' => j += src[j + 1..].find('"').unwrap() + 1,
                    b'(' => depth += 1,
                    b')' => {
                        depth -= 1;
                        if depth == 0 && !outer {
                            span_end = Some(j);
                            break;
                        }
                        if depth == -1 {
                            span_end = Some(j);
                            break;
                        }
                    }
                    b';' if depth <= 0 => {
                        span_end = Some(j);
                        break;
                    }
                    _ => {}
                }
                j += 1;
            }
            let span = &src[end + 1..span_end.unwrap_or(b.len())];
            let mut labels = Vec::new();
            if span
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .any(|w| w == "TABLE")
            {
                labels = vec!["schema".to_string(), "table".to_string()];
            } else if let Some(p) = span.find("&[\"") {
                let list = &span[p + 2..p + 2 + span[p + 2..].find(']').unwrap()];
                labels = list
                    .split(',')
                    .map(|s| s.trim().trim_matches('"').to_string())
                    .collect();
            }
            out.insert(lit.to_string(), MetricDef { histogram, labels });
        }
        i = end + 1;
    }
    out
}

/// One metric selector in an expression: name and label matchers text.
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: String,
}

const AGGREGATORS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
];
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
];
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Metric selectors of a PromQL expression (a small tokenizer: skips strings,
/// label matchers, ranges, grouping clauses, functions and keywords).
fn selectors(expr: &str) -> Vec<Selector> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_to = |i: usize, close: char| -> usize {
        let mut j = i;
        while j < c.len() && c[j] != close {
            if c[j] == '"' {
                j += 1;
                while j < c.len() && c[j] != '"' {
                    if c[j] == '\\' {
                        j += 1;
                    }
                    j += 1;
                }
            }
            j += 1;
        }
        j
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i += 1;
            while i < c.len() && c[i] != ch {
                if c[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if ch == '{' {
            // a selector without a metric name ({__name__=…}) is not used here
            i = skip_to(i, '}') + 1;
        } else if ch == '[' {
            i = skip_to(i, ']') + 1;
        } else if ch == '$' || ch.is_ascii_digit() || ch == '.' {
            i += 1;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut k = i;
            while k < c.len() && c[k].is_whitespace() {
                k += 1;
            }
            if GROUPING.contains(&word.as_str()) {
                if k < c.len() && c[k] == '(' {
                    i = skip_to(k, ')') + 1;
                }
            } else if AGGREGATORS.contains(&word.as_str()) || KEYWORDS.contains(&word.as_str()) {
            } else if k < c.len() && c[k] == '(' {
                // a function call
            } else {
                let matchers = if i < c.len() && c[i] == '{' {
                    let e = skip_to(i, '}');
                    let m: String = c[i + 1..e].iter().collect();
                    i = e + 1;
                    m
                } else {
                    String::new()
                };
                out.push(Selector {
                    name: word,
                    matchers,
                });
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every PromQL expression of the dashboard: (where, expression). Template
/// variable queries `label_values(sel, label)` become `count by (label) (sel)`.
fn dashboard_exprs(dash: &J) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn walk(v: &J, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            J::Object(m) => {
                let title = m
                    .get("title")
                    .and_then(J::as_str)
                    .unwrap_or(title)
                    .to_string();
                if let (Some(J::String(e)), Some(r)) = (m.get("expr"), m.get("refId")) {
                    out.push((
                        format!("panel {title:?} target {}", r.as_str().unwrap_or("?")),
                        e.clone(),
                    ));
                }
                for (k, x) in m {
                    if k != "templating" {
                        walk(x, &title, out);
                    }
                }
            }
            J::Array(a) => a.iter().for_each(|x| walk(x, title, out)),
            _ => {}
        }
    }
    walk(dash, "", &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or_default();
        let name = var["name"].as_str().unwrap_or_default();
        if let Some(inner) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let (sel, label) = inner
                .rsplit_once(',')
                .expect("label_values(selector, label)");
            out.push((
                format!("variable ${name}"),
                format!("count by ({}) ({})", label.trim(), sel.trim()),
            ));
        } else if !q.is_empty() {
            out.push((format!("variable ${name}"), q.to_string()));
        }
    }
    out
}

fn load_dashboard() -> J {
    serde_json::from_str(&read("grafana/dashboards/meridian.json")).expect("dashboard is JSON")
}

#[test]
fn dashboard_queries_use_only_metrics_from_src_metrics_rs() {
    let defs = metrics_from_source();
    assert!(
        defs.len() >= 20 && defs.contains_key("apply_upserts_total"),
        "could not read the metric definitions from src/metrics.rs: {defs:?}"
    );
    let dash = load_dashboard();
    let mut errors = Vec::new();
    if dash["uid"] != "meridian" {
        errors.push(format!(
            "dashboard uid is {}, expected \"meridian\" (served at /d/meridian)",
            dash["uid"]
        ));
    }
    let exprs = dashboard_exprs(&dash);
    assert!(
        exprs.len() > 20,
        "too few expressions found: {}",
        exprs.len()
    );
    let mut used = BTreeSet::new();
    for (place, expr) in &exprs {
        let sels = selectors(expr);
        if sels.is_empty() {
            errors.push(format!("{place}: no metric in `{expr}`"));
        }
        for s in sels {
            if s.name == "up" && place.starts_with("variable") {
                continue;
            }
            let (base, suffix) = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| s.name.strip_suffix(suf).map(|b| (b.to_string(), *suf)))
                .filter(|(b, _)| defs.get(b).is_some_and(|d| d.histogram))
                .unwrap_or((s.name.clone(), ""));
            let Some(def) = defs.get(&base) else {
                errors.push(format!(
                    "{place}: metric {} is not defined in src/metrics.rs",
                    s.name
                ));
                continue;
            };
            used.insert(base.clone());
            if def.histogram && suffix.is_empty() {
                errors.push(format!(
                    "{place}: histogram {base} used without _bucket/_sum/_count"
                ));
            }
            if def.histogram
                && s.name.ends_with("_bucket")
                && !expr.contains("le)")
                && !expr.contains("le,")
            {
                errors.push(format!(
                    "{place}: {} aggregated without keeping `le`",
                    s.name
                ));
            }
            let has_table = def.labels.iter().any(|l| l == "table");
            if !s.matchers.contains("region=~\"$region\"") {
                errors.push(format!(
                    "{place}: {} is not filtered by region=~\"$region\"",
                    s.name
                ));
            }
            if has_table
                && !place.starts_with("variable")
                && !s.matchers.contains("table=~\"$table\"")
            {
                errors.push(format!(
                    "{place}: {} has a table label but is not filtered by table=~\"$table\"",
                    s.name
                ));
            }
            if !has_table && s.matchers.contains("table") {
                errors.push(format!(
                    "{place}: {} has no table label but is filtered by table",
                    s.name
                ));
            }
        }
    }
    for name in defs.keys() {
        if !used.contains(name) {
            errors.push(format!("metric {name} is on no dashboard panel"));
        }
    }
    // Every panel target is labelled per region in its legend.
    for p in dash["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let legend = t["legendFormat"].as_str().unwrap_or_default();
            if !legend.contains("{{region}}") {
                errors.push(format!(
                    "panel {:?}: legend {legend:?} does not show the region",
                    p["title"]
                ));
            }
        }
    }
    fail_if_any("dashboard", &errors);
}

#[test]
fn promql_tokenizer_finds_metric_selectors() {
    let s = selectors(
        r#"histogram_quantile(0.99, sum by (region, le) (rate(a_bucket{region=~"$region", x="}"}[$__rate_interval]))) or sum by (region) (b) * 0 - time()"#,
    );
    let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a_bucket", "b"]);
    assert!(s[0].matchers.contains("region=~\"$region\""));
    let defs = metrics_from_source();
    assert_eq!(defs["apply_upserts_total"].labels, ["schema", "table"]);
    assert_eq!(defs["resolved_timestamp_seconds"].labels, ["schema"]);
    assert!(defs["apply_duration_seconds"].histogram && defs["http_latency_seconds"].histogram);
    assert!(defs["target_pool_size"].labels.is_empty() && !defs["target_pool_size"].histogram);
    assert_eq!(defs["http_status_codes_total"].labels, ["code"]);
}

// ------------------------------------------------------ live Prometheus

/// Kills (SIGTERM, then SIGKILL) a child process when dropped.
struct Reaper {
    name: &'static str,
    child: Child,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "{} did not stop on SIGTERM; killing its process group",
            self.name
        );
        // spawned with process_group(0): its pgid is its pid
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(-(self.child.id() as i32)),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMETHEUS") {
        return PathBuf::from(p);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("prometheus");
        if p.is_file() {
            return p;
        }
    }
    let p = PathBuf::from("/usr/bin/prometheus");
    if p.is_file() {
        return p;
    }
    panic!(
        "no `prometheus` binary on PATH or at /usr/bin/prometheus: this test runs a real Prometheus \
         against a live demo. Install it (Debian: `apt-get install -y prometheus`) or set PROMETHEUS=/path/to/prometheus"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// HTTP/1.0 GET (no chunking, connection closes): (status, body).
fn http_get(port: u16, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

enum QueryResult {
    Series(usize),
    Invalid(String),
}

fn query(port: u16, expr: &str) -> QueryResult {
    match http_get(port, &format!("/api/v1/query?query={}", urlencode(expr))) {
        Err(e) => QueryResult::Invalid(format!("request failed: {e}")),
        Ok((_, body)) => match serde_json::from_str::<J>(&body) {
            Err(_) => QueryResult::Invalid(format!("not JSON: {body}")),
            Ok(j) if j["status"] == "success" => {
                QueryResult::Series(j["data"]["result"].as_array().map(Vec::len).unwrap_or(1))
            }
            Ok(j) => QueryResult::Invalid(format!("{}: {}", j["errorType"], j["error"])),
        },
    }
}

/// Grafana's variables replaced by concrete values. `.+` (not Grafana's `.*`
/// All value) so that a label filter on a metric without that label fails.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$__range", "5m")
        .replace("$__interval", "2s")
        .replace("$region", ".+")
        .replace("$table", ".+")
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn dashboard_queries_return_series_from_a_live_demo() {
    let started = Instant::now();
    let prometheus = prometheus_binary();
    let exe = env!("CARGO_BIN_EXE_meridian");
    let help = Command::new(exe)
        .args(["demo", "--help"])
        .output()
        .expect("run meridian");
    assert!(
        help.status.success(),
        "`meridian demo` is not available yet, so there is no live east/west run to scrape:\n{}",
        String::from_utf8_lossy(&help.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let demo_log = dir.path().join("demo.log");
    let mut demo = Command::new(exe)
        .args([
            "demo",
            "--duration",
            "90s",
            "--rate",
            "100",
            "--keep",
            "--dataDir",
        ])
        .arg(dir.path().join("demo"))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&demo_log).unwrap())
        .spawn()
        .expect("spawn meridian demo");
    let stdout = demo.stdout.take().unwrap();
    let mut demo = Reaper {
        name: "meridian demo",
        child: demo,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // `metrics: <component> <region> http://127.0.0.1:<port>/metrics`
    let mut targets: BTreeMap<String, (String, String)> = BTreeMap::new();
    let until = Instant::now() + Duration::from_secs(60);
    while targets.len() < 4 {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let w: Vec<&str> = line.split_whitespace().collect();
                if w.len() == 4 && w[0] == "metrics:" {
                    let addr = w[3]
                        .strip_prefix("http://")
                        .and_then(|a| a.strip_suffix("/metrics"))
                        .unwrap_or_else(|| panic!("unexpected metrics URL in {line:?}"));
                    targets.insert(w[1].to_string(), (w[2].to_string(), addr.to_string()));
                }
            }
            Err(_) => panic!(
                "meridian demo announced {} of 4 metrics endpoints ({:?}) within 60s (exited: {:?}); its log:\n{}",
                targets.len(),
                targets,
                demo.child.try_wait(),
                tail(&demo_log)
            ),
        }
    }
    let expected = [
        ("east_west", "west"),
        ("west_east", "east"),
        ("changefeed_east", "east"),
        ("changefeed_west", "west"),
    ];
    for (c, r) in expected {
        assert_eq!(
            targets.get(c).map(|(r, _)| r.as_str()),
            Some(r),
            "demo should announce component {c} in region {r}: {targets:?}"
        );
    }
    // keep draining stdout so the demo never blocks on a full pipe
    std::thread::spawn(move || while rx.recv().is_ok() {});

    let port = free_port();
    let mut config = String::from(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: meridian\n    metrics_path: /metrics\n    static_configs:\n",
    );
    for (component, (region, addr)) in &targets {
        config.push_str(&format!(
            "      - targets: [\"{addr}\"]\n        labels:\n          region: {region}\n          component: {component}\n"
        ));
    }
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, &config).unwrap();
    let prom_log = dir.path().join("prometheus.log");
    let prom = Command::new(&prometheus)
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&prom_log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", prometheus.display()));
    let mut prom = Reaper {
        name: "prometheus",
        child: prom,
    };

    let check_alive = |demo: &mut Reaper, prom: &mut Reaper| {
        if let Ok(Some(st)) = demo.child.try_wait() {
            panic!(
                "meridian demo exited early ({st}); its log:\n{}",
                tail(&demo_log)
            );
        }
        if let Ok(Some(st)) = prom.child.try_wait() {
            panic!("prometheus exited ({st}); its log:\n{}", tail(&prom_log));
        }
    };

    // Ready, then all four targets up.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        check_alive(&mut demo, &mut prom);
        if matches!(http_get(port, "/-/ready"), Ok((200, _))) {
            break;
        }
        assert!(
            Instant::now() < until,
            "prometheus not ready in 20s:\n{}",
            tail(&prom_log)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        check_alive(&mut demo, &mut prom);
        if let QueryResult::Series(4) = query(port, "up{job=\"meridian\"} == 1") {
            break;
        }
        assert!(
            Instant::now() < until,
            "not all 4 demo endpoints are up in prometheus after 20s: {:?}",
            http_get(port, "/api/v1/targets").map(|(_, b)| b)
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Evaluate every expression until all return series, while the workload
    // runs. Invalid expressions fail at once; empty ones get until the deadline.
    let exprs = dashboard_exprs(&load_dashboard());
    let first_eval = Instant::now() + Duration::from_secs(10);
    let deadline =
        (Instant::now() + Duration::from_secs(60)).min(started + Duration::from_secs(110));
    while Instant::now() < first_eval {
        check_alive(&mut demo, &mut prom);
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut failures;
    loop {
        check_alive(&mut demo, &mut prom);
        failures = Vec::new();
        let mut invalid = false;
        for (place, expr) in &exprs {
            let q = concrete(expr);
            match query(port, &q) {
                QueryResult::Series(0) => failures.push(format!("{place}: no series for `{q}`")),
                QueryResult::Series(_) => {}
                QueryResult::Invalid(e) => {
                    invalid = true;
                    failures.push(format!("{place}: invalid: {e}\n      `{q}`"));
                }
            }
        }
        if failures.is_empty() || invalid || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }

    if !failures.is_empty() {
        // What the demo did export, to tell a missing metric from a wrong query.
        let exported = match http_get(
            port,
            &format!(
                "/api/v1/query?query={}",
                urlencode("count by (__name__, component) ({job=\"meridian\"})")
            ),
        ) {
            Ok((_, b)) => serde_json::from_str::<J>(&b)
                .ok()
                .and_then(|j| {
                    j["data"]["result"].as_array().map(|a| {
                        a.iter()
                            .map(|r| {
                                format!("{}@{}", r["metric"]["__name__"], r["metric"]["component"])
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                })
                .unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        let missing: Vec<String> = metrics_from_source()
            .into_keys()
            .filter(|n| !exported.contains(&format!("\"{n}")))
            .collect();
        panic!(
            "{} of {} dashboard expressions failed against a live demo after {:?}:\n  - {}\n\
             metrics src/metrics.rs defines that the demo never exported: {missing:?}\n\
             demo log tail:\n{}",
            failures.len(),
            exprs.len(),
            started.elapsed(),
            failures.join("\n  - "),
            tail(&demo_log)
        );
    }
    eprintln!(
        "all {} dashboard expressions returned series from a live demo ({:?})",
        exprs.len(),
        started.elapsed()
    );
    drop(prom);
    drop(demo);
}
