//! `meridian userscript --check`: a readable summary of what a script configured.

use std::fmt::Write;

use super::{MergeKind, ScriptConfig};

/// Formats `config` for people: sources, tables and options.
pub fn summary(script: &str, config: &ScriptConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{script}: loaded");
    if config.sources.is_empty() && config.tables.is_empty() && config.options.is_empty() {
        let _ = writeln!(
            out,
            "  configures nothing: rows go to the tables their topics name"
        );
        return out;
    }
    if !config.sources.is_empty() {
        let _ = writeln!(out, "sources:");
        for (name, s) in &config.sources {
            let route = match (&s.target, s.has_dispatch) {
                (Some(t), _) => format!("every row to {t}"),
                (None, true) => "dispatch function".to_string(),
                (None, false) => "by topic".to_string(),
            };
            let _ = write!(out, "  {name}: {route}");
            if s.has_dispatch {
                match s.deletes_to.as_deref() {
                    Some("") => out.push_str("; deletes to the topic's table"),
                    Some(t) => {
                        let _ = write!(out, "; deletes to {t}");
                    }
                    None => {
                        out.push_str("; deletes to the topic's table (or a deletesTo function)")
                    }
                }
            }
            out.push('\n');
        }
    }
    if !config.tables.is_empty() {
        let _ = writeln!(out, "tables:");
        for (name, t) in &config.tables {
            let _ = writeln!(out, "  {name}:");
            if !t.cas.is_empty() {
                let _ = writeln!(out, "    cas: {}", t.cas.join(", "));
            }
            let merge = match &t.merge {
                None => "none (losers of compare-and-set are dropped)".to_string(),
                Some(MergeKind::Standard { has_fallback: true }) => {
                    "standardMerge with a fallback function".to_string()
                }
                Some(MergeKind::Standard {
                    has_fallback: false,
                }) => "standardMerge".to_string(),
                Some(MergeKind::Custom) => "custom merge function".to_string(),
            };
            if !t.cas.is_empty() || t.merge.is_some() {
                let _ = writeln!(out, "    merge: {merge}");
            }
            for (col, d) in &t.deadlines {
                let _ = writeln!(
                    out,
                    "    deadline: {col} within {}",
                    humantime::format_duration(*d)
                );
            }
            if !t.delete_key.is_empty() {
                let _ = writeln!(out, "    delete key: {}", t.delete_key.join(", "));
            }
            for (col, e) in &t.exprs {
                let _ = writeln!(out, "    expr: {col} = {e}");
            }
            if let Some(x) = &t.extras {
                let _ = writeln!(out, "    extras column: {x}");
            }
            if !t.ignore.is_empty() {
                let _ = writeln!(out, "    ignored columns: {}", t.ignore.join(", "));
            }
            if t.has_map {
                let _ = writeln!(out, "    map function: yes");
            }
            if t.has_apply {
                let _ = writeln!(
                    out,
                    "    apply function: yes (the script writes rows through getTX())"
                );
            }
            if let Some(n) = t.row_limit {
                let _ = writeln!(out, "    row limit: {n}");
            }
        }
    }
    if !config.options.is_empty() {
        let _ = writeln!(out, "options:");
        for (k, v) in &config.options {
            let _ = writeln!(out, "  --{k}={v}");
        }
    }
    out
}
