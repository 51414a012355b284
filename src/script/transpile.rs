//! TypeScript → JavaScript with oxc: types are stripped (not checked), the
//! output keeps ES module syntax, and a source map lets error positions
//! reported by QuickJS point back into the original `.ts` source.

use std::path::Path;

use oxc::allocator::Allocator;
use oxc::ast::ast::Statement;
use oxc::codegen::{Codegen, CodegenOptions};
use oxc::parser::Parser;
use oxc::semantic::SemanticBuilder;
use oxc::span::SourceType;
use oxc::transformer::{TransformOptions, Transformer};

/// One module after transpiling.
#[derive(Debug, Clone)]
pub struct Transpiled {
    /// The module name QuickJS knows it by (its path relative to the script folder).
    pub name: String,
    /// The JavaScript QuickJS runs.
    pub code: String,
    /// Maps positions in `code` back to the original source.
    pub map: LineMap,
    /// Static imports and re-exports that remain after types are stripped:
    /// the specifier and its 1-based line and column in the original source.
    pub imports: Vec<(String, u32, u32)>,
}

/// A position mapping from generated code to original source, 0-based
/// (generated line, generated column, source line, source column), sorted.
#[derive(Debug, Clone, Default)]
pub struct LineMap {
    tokens: Vec<(u32, u32, u32, u32)>,
}

impl LineMap {
    /// Maps a 1-based generated position to a 1-based source position:
    /// the nearest mapping at or before it on the same line, else the first
    /// mapping on that line.
    pub fn lookup(&self, line: u32, col: u32) -> Option<(u32, u32)> {
        if line == 0 {
            return None;
        }
        let (l, c) = (line - 1, col.saturating_sub(1));
        let idx = self.tokens.partition_point(|t| (t.0, t.1) <= (l, c));
        let tok = if idx > 0 && self.tokens[idx - 1].0 == l {
            Some(self.tokens[idx - 1])
        } else {
            self.tokens.get(idx).filter(|t| t.0 == l).copied()
        };
        tok.map(|t| (t.2 + 1, t.3 + 1))
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(source: &str, offset: u32) -> (u32, u32) {
    let offset = (offset as usize).min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() as u32 + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before[line_start..].chars().count() as u32 + 1;
    (line, col)
}

/// Transpiles `source` (TypeScript when `name` ends in `.ts`, else JavaScript).
/// Errors read `name:line:col: message`.
pub fn transpile(name: &str, source: &str) -> Result<Transpiled, String> {
    let allocator = Allocator::default();
    let path = Path::new(name);
    let source_type = if name.ends_with(".ts") || name.ends_with(".mts") {
        SourceType::ts()
    } else {
        SourceType::mjs()
    };
    let fail = |diags: &[oxc::diagnostics::OxcDiagnostic]| -> String {
        let d = &diags[0];
        let offset = d.labels.first().map(|l| l.offset()).unwrap_or(0);
        let (line, col) = line_col(source, offset);
        format!("{name}:{line}:{col}: {}", d.message)
    };

    let parsed = Parser::new(&allocator, source, source_type).parse();
    if parsed.panicked || !parsed.diagnostics.is_empty() {
        let errors: Vec<_> = parsed.diagnostics.into_vec();
        if errors.is_empty() {
            return Err(format!("{name}:1:1: could not parse"));
        }
        return Err(fail(&errors));
    }
    let mut program = parsed.program;

    let semantic = SemanticBuilder::new()
        .with_check_syntax_error(true)
        .with_excess_capacity(2.0)
        .build(&program);
    let errors: Vec<_> = semantic.diagnostics.into_vec();
    if !errors.is_empty() {
        return Err(fail(&errors));
    }
    let scoping = semantic.semantic.into_scoping();

    let options = TransformOptions::default();
    let ret =
        Transformer::new(&allocator, path, &options).build_with_scoping(scoping, &mut program);
    let errors: Vec<_> = ret.diagnostics.into_vec();
    if let Some(e) = errors
        .iter()
        .find(|d| d.severity == oxc::diagnostics::Severity::Error)
    {
        return Err(fail(std::slice::from_ref(e)));
    }

    super::console_guard::guard_console_calls(&allocator, &mut program);
    super::readonly_params::mark_read_only_params(&allocator, &mut program);

    let mut imports = Vec::new();
    for stmt in &program.body {
        let found = match stmt {
            Statement::ImportDeclaration(d) => Some(&d.source),
            Statement::ExportAllDeclaration(d) => Some(&d.source),
            Statement::ExportFromDeclaration(d) => Some(&d.source),
            _ => None,
        };
        if let Some(lit) = found {
            let (line, col) = line_col(source, lit.span.start);
            imports.push((lit.value.to_string(), line, col));
        }
    }

    let out = Codegen::new()
        .with_options(CodegenOptions {
            source_map_path: Some(path.to_path_buf()),
            ..CodegenOptions::default()
        })
        .build(&program);
    let mut tokens: Vec<(u32, u32, u32, u32)> = out
        .map
        .as_ref()
        .map(|m| {
            m.get_tokens()
                .map(|t| {
                    (
                        t.get_dst_line(),
                        t.get_dst_col(),
                        t.get_src_line(),
                        t.get_src_col(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    tokens.sort_unstable();
    Ok(Transpiled {
        name: name.to_string(),
        code: out.code,
        map: LineMap { tokens },
        imports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_types_and_keeps_modules() {
        let t = transpile(
            "a.ts",
            "import { Document } from \"replicator@v1\";\nimport * as api from \"replicator@v1\";\nexport function f(d: Document): number { return api.x as number; }\ninterface X { a: string }\n",
        )
        .unwrap();
        assert!(!t.code.contains("interface"), "{}", t.code);
        assert!(!t.code.contains(": number"), "{}", t.code);
        assert!(t.code.contains("export function f(d)"), "{}", t.code);
        // The type-only import is elided; the namespace import stays.
        assert_eq!(t.imports, vec![("replicator@v1".to_string(), 2, 22)]);
    }

    #[test]
    fn syntax_errors_carry_file_line_col() {
        let err = transpile("bad.ts", "let a = 1;\nlet b = ;\n").unwrap_err();
        assert!(err.starts_with("bad.ts:2:9: "), "{err}");
    }

    #[test]
    fn maps_generated_positions_back() {
        let src = "type T = {\n  a: string;\n};\n\n\nfunction g(x: T): never {\n    throw new Error(\"boom\");\n}\ng({a: \"\"});\n";
        let t = transpile("m.ts", src).unwrap();
        let (gl, gc) = t
            .code
            .lines()
            .enumerate()
            .find_map(|(i, l)| l.find("throw").map(|c| (i as u32 + 1, c as u32 + 1)))
            .unwrap();
        assert_eq!(t.map.lookup(gl, gc), Some((7, 5)));
    }
}
