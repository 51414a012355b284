//! Proves, at load time, that a dispatch function neither changes nor keeps
//! the `doc` and `meta` it is handed, so the engine can skip the work that
//! guards against those things.
//!
//! After `dispatch` returns a row's own document, the engine must know
//! whether the script edited it in place: a check per row that re-reads
//! every property and lists the keys (about a fifth of what the seed's
//! dispatch costs). And every row gets a new `meta` object, because a script
//! may keep or change it (another tenth). A function that provably does
//! neither needs neither.
//!
//! The proof is deliberately narrow, and anything it does not recognise
//! keeps the checks. A parameter qualifies when every use of it, inside the
//! function itself (a closure that mentions it disqualifies it), is one of:
//! - a read of one of its properties whose value is then only read: never
//!   the target of an assignment, `++`, `delete` or destructuring, nor the
//!   callee of a method call (the document's values are primitives: the
//!   engine sends documents with nested values the slow way);
//! - an operand of a comparison, `typeof`, a template or a condition;
//! - the only argument of `JSON.stringify`;
//! - for `doc` only: an element of an array literal that is a property of
//!   the returned object literal, or that is assigned into a local object
//!   (`const ret = {}`) that the function only writes into and returns;
//!   and `{...doc}`;
//! - for `meta` only: reads of `schema`, `table`, `nanos`, `logical` and of
//!   the elements of `key` (never `key` itself, which is an array).
//!
//! A function using `arguments` or `eval`, or that is `async` or a
//! generator (its body outlives the call), does not qualify.
//!
//! Each qualifying function expression `f` given as `dispatch:`/`deletesTo:`
//! or bound to a module-level `const`/`let` becomes
//! `__meridianReadOnly({ name: f }.name, flags)`, which records the flags
//! for the engine; the object literal keeps the name a stack trace shows.

use std::collections::HashMap;

use oxc::allocator::{Allocator, TakeIn};
use oxc::ast::ast::{
    Argument, AssignmentOperator, BinaryOperator, Expression, FormalParameters, FunctionType,
    IdentifierName, NumberBase, ObjectPropertyKind, Program, PropertyKey, PropertyKind,
    UnaryOperator,
};
use oxc::ast::builder::AstBuilder;
use oxc::ast::AstKind;
use oxc::ast_visit::{walk_mut, VisitMut};
use oxc::semantic::{
    AstNodes, IsGlobalReference, NodeId, Scoping, Semantic, SemanticBuilder, SymbolId,
};
use oxc::span::{GetSpan, Span};

/// The function never changes `doc` in place and keeps it only in its result.
pub const DOC: u8 = 1;
/// The function never changes or keeps `meta` (or its `key` array).
pub const META: u8 = 2;
/// The global the engine defines to receive the flags.
pub const MARKER: &str = "__meridianReadOnly";

/// Marks the qualifying functions of `program`; returns how many.
pub fn mark_read_only_params<'a>(allocator: &'a Allocator, program: &mut Program<'a>) -> usize {
    let found = {
        let built = SemanticBuilder::new().with_build_nodes(true).build(program);
        Analysis::new(&built.semantic).run()
    };
    if found.is_empty() {
        return 0;
    }
    let mut pass = Marker {
        ast: AstBuilder::new(allocator),
        allocator,
        found,
        marked: 0,
    };
    pass.visit_program(program);
    pass.marked
}

struct Marker<'a> {
    ast: AstBuilder<'a>,
    allocator: &'a Allocator,
    /// Function node → (flags, the name it would have been given, or "").
    found: HashMap<NodeId, (u8, String)>,
    marked: usize,
}

impl<'a> VisitMut<'a> for Marker<'a> {
    fn visit_expression(&mut self, it: &mut Expression<'a>) {
        walk_mut::walk_expression(self, it);
        let id = match it {
            Expression::ArrowFunctionExpression(f) => f.node_id.get(),
            Expression::FunctionExpression(f) => f.node_id.get(),
            _ => return,
        };
        let Some((flags, name)) = self.found.get(&id) else {
            return;
        };
        let span = it.span();
        let mut func = it.take_in(&self.ast);
        if !name.is_empty() {
            // `{ name: f }.name`: the name QuickJS gives `f` (and shows in
            // stack traces) is inferred from where it is written.
            let name: &'a str = self.allocator.alloc_str(name);
            let property = ObjectPropertyKind::new_object_property(
                span,
                PropertyKind::Init,
                PropertyKey::new_static_identifier(span, name, &self.ast),
                func,
                false,
                false,
                false,
                &self.ast,
            );
            let object = Expression::new_object_expression(
                span,
                oxc::allocator::Vec::from_iter_in([property], &self.ast),
                &self.ast,
            );
            func = Expression::new_static_member_expression(
                span,
                object,
                IdentifierName::new(span, name, &self.ast),
                false,
                &self.ast,
            );
        }
        let flags = Expression::new_numeric_literal(
            span,
            f64::from(*flags),
            None,
            NumberBase::Decimal,
            &self.ast,
        );
        let args = [Argument::from(func), Argument::from(flags)];
        *it = Expression::new_call_expression(
            span,
            Expression::new_identifier(span, MARKER, &self.ast),
            None,
            oxc::allocator::Vec::from_iter_in(args, &self.ast),
            false,
            &self.ast,
        );
        self.marked += 1;
    }
}

/// What a parameter is to the engine.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Doc,
    Meta,
}

struct Analysis<'s, 'a> {
    nodes: &'s AstNodes<'a>,
    scoping: &'s Scoping,
    /// Spans of every `arguments` and `eval` reference.
    risky: Vec<Span>,
}

impl<'s, 'a> Analysis<'s, 'a> {
    fn new(semantic: &'s Semantic<'a>) -> Self {
        let nodes = semantic.nodes();
        let risky = nodes
            .iter()
            .filter_map(|n| match n.kind() {
                AstKind::IdentifierReference(r) if r.name == "arguments" || r.name == "eval" => {
                    Some(r.span)
                }
                _ => None,
            })
            .collect();
        Analysis {
            nodes,
            scoping: semantic.scoping(),
            risky,
        }
    }

    fn run(&self) -> HashMap<NodeId, (u8, String)> {
        let mut found = HashMap::new();
        for node in self.nodes.iter() {
            let id = node.id();
            let (params, span, unnamed) = match node.kind() {
                AstKind::ArrowFunctionExpression(f) if !f.r#async => (&*f.params, f.span, true),
                AstKind::Function(f)
                    if f.r#type == FunctionType::FunctionExpression
                        && !f.r#async
                        && !f.generator =>
                {
                    (&*f.params, f.span, f.id.is_none())
                }
                _ => continue,
            };
            let Some(name) = self.candidate_name(id) else {
                continue;
            };
            if self
                .risky
                .iter()
                .any(|r| span.start <= r.start && r.end <= span.end)
            {
                continue;
            }
            let mut flags = 0;
            for (i, role, flag) in [(0, Role::Doc, DOC), (1, Role::Meta, META)] {
                let ok = match param(params, i) {
                    Param::Absent => true,
                    Param::Simple(sym) => self.param_ok(sym, id, role),
                    Param::Other => false,
                };
                if ok {
                    flags |= flag;
                }
            }
            if flags != 0 {
                found.insert(id, (flags, if unnamed { name } else { String::new() }));
            }
        }
        found
    }

    /// The name a function would be given where it may be a dispatch
    /// function: the value of a `dispatch`/`deletesTo` property, or bound to
    /// a module-level variable. Elsewhere (a callback built per row, say)
    /// marking would cost more than it saves.
    fn candidate_name(&self, func: NodeId) -> Option<String> {
        let (parent, child) = self.parent(func);
        match self.nodes.kind(parent) {
            AstKind::ObjectProperty(p)
                if p.kind == PropertyKind::Init && !p.method && p.value.span() == child =>
            {
                let name = p.key.static_name()?;
                matches!(name.as_ref(), "dispatch" | "deletesTo").then(|| name.to_string())
            }
            AstKind::VariableDeclarator(d) if self.enclosing_function(parent).is_none() => {
                d.id.get_binding_identifier().map(|b| b.name.to_string())
            }
            _ => None,
        }
    }

    /// The parent of `id`, looking through parentheses, and the span of
    /// the child it was reached from (the outermost parenthesis).
    fn parent(&self, id: NodeId) -> (NodeId, Span) {
        let mut child = self.nodes.kind(id).span();
        let mut p = self.nodes.parent_id(id);
        while let AstKind::ParenthesizedExpression(e) = self.nodes.kind(p) {
            child = e.span;
            p = self.nodes.parent_id(p);
        }
        (p, child)
    }

    fn enclosing_function(&self, id: NodeId) -> Option<NodeId> {
        self.nodes.ancestor_ids(id).find(|&a| {
            matches!(
                self.nodes.kind(a),
                AstKind::Function(_) | AstKind::ArrowFunctionExpression(_)
            )
        })
    }

    /// Every reference to `sym` is a use `role` allows, inside `func`.
    fn param_ok(&self, sym: SymbolId, func: NodeId, role: Role) -> bool {
        self.scoping.get_resolved_references(sym).all(|r| {
            let id = r.node_id();
            !r.is_write()
                && self.enclosing_function(id) == Some(func)
                && self.use_ok(id, role, func)
        })
    }

    fn use_ok(&self, id: NodeId, role: Role, func: NodeId) -> bool {
        let (parent, child) = self.parent(id);
        match self.nodes.kind(parent) {
            AstKind::StaticMemberExpression(m) if m.object.span() == child => {
                let prop = m.property.name.as_str();
                match role {
                    Role::Doc => self.primitive_read(parent, Some(prop)),
                    Role::Meta => match prop {
                        "schema" | "table" | "nanos" | "logical" => {
                            self.primitive_read(parent, Some(prop))
                        }
                        "key" => self.key_read(parent),
                        _ => false,
                    },
                }
            }
            AstKind::ComputedMemberExpression(m) if m.object.span() == child => {
                role == Role::Doc && self.primitive_read(parent, None)
            }
            AstKind::CallExpression(_) if self.json_stringify_of(parent, child) => true,
            AstKind::ArrayExpression(_) if role == Role::Doc => self.kept_in_result(parent, func),
            AstKind::SpreadElement(_) if role == Role::Doc => matches!(
                self.nodes.kind(self.nodes.parent_id(parent)),
                AstKind::ObjectExpression(_)
            ),
            _ => self.only_inspected(parent, child),
        }
    }

    /// `meta.key` at `member`: only its elements (or the whole, to
    /// `JSON.stringify` or a comparison) are read.
    fn key_read(&self, member: NodeId) -> bool {
        let (parent, child) = self.parent(member);
        match self.nodes.kind(parent) {
            AstKind::StaticMemberExpression(m) if m.object.span() == child => {
                self.primitive_read(parent, Some(m.property.name.as_str()))
            }
            AstKind::ComputedMemberExpression(m) if m.object.span() == child => {
                self.primitive_read(parent, None)
            }
            AstKind::CallExpression(_) => self.json_stringify_of(parent, child),
            _ => self.only_inspected(parent, child),
        }
    }

    /// The value at `member` (a primitive) is read, not written, and is not
    /// called as a method of the object it came from.
    fn primitive_read(&self, member: NodeId, prop: Option<&str>) -> bool {
        let (parent, child) = self.parent(member);
        match self.nodes.kind(parent) {
            AstKind::AssignmentExpression(a) => a.left.span() != child,
            AstKind::UpdateExpression(_)
            | AstKind::ArrayAssignmentTarget(_)
            | AstKind::ObjectAssignmentTarget(_)
            | AstKind::AssignmentTargetRest(_)
            | AstKind::AssignmentTargetWithDefault(_)
            | AstKind::AssignmentTargetPropertyIdentifier(_)
            | AstKind::AssignmentTargetPropertyProperty(_) => false,
            AstKind::UnaryExpression(u) => u.operator != UnaryOperator::Delete,
            AstKind::ForInStatement(f) => f.left.span() != child,
            AstKind::ForOfStatement(f) => f.left.span() != child,
            AstKind::CallExpression(c) => {
                c.callee.span() != child || prop == Some("hasOwnProperty")
            }
            AstKind::NewExpression(c) => c.callee.span() != child,
            AstKind::TaggedTemplateExpression(t) => t.tag.span() != child,
            _ => true,
        }
    }

    /// The value at `child` of `parent` is looked at and then dropped.
    fn only_inspected(&self, parent: NodeId, child: Span) -> bool {
        match self.nodes.kind(parent) {
            // `x instanceof K` hands `x` to K's Symbol.hasInstance.
            AstKind::BinaryExpression(b) => b.operator != BinaryOperator::Instanceof,
            AstKind::ExpressionStatement(_) => true,
            AstKind::UnaryExpression(u) => u.operator != UnaryOperator::Delete,
            AstKind::TemplateLiteral(_) => !matches!(
                self.nodes.kind(self.nodes.parent_id(parent)),
                AstKind::TaggedTemplateExpression(_)
            ),
            AstKind::IfStatement(s) => s.test.span() == child,
            AstKind::WhileStatement(s) => s.test.span() == child,
            AstKind::DoWhileStatement(s) => s.test.span() == child,
            AstKind::ConditionalExpression(c) => c.test.span() == child,
            AstKind::SwitchStatement(s) => s.discriminant.span() == child,
            AstKind::SequenceExpression(s) => {
                s.expressions.last().is_some_and(|e| e.span() != child)
            }
            _ => false,
        }
    }

    /// `call` is `JSON.stringify(x)` (the global, one argument) and `x` is at `child`.
    fn json_stringify_of(&self, call: NodeId, child: Span) -> bool {
        let AstKind::CallExpression(c) = self.nodes.kind(call) else {
            return false;
        };
        let global_json = super::console_guard::json_stringify(&c.callee)
            .is_some_and(|id| id.is_global_reference(self.scoping));
        global_json
            && !c.optional
            && c.arguments.len() == 1
            && matches!(c.arguments[0].as_expression(), Some(e) if e.span() == child)
    }

    /// The array literal at `array` (holding `doc`) goes only into the
    /// function's result, where nothing of the script's can reach it again.
    fn kept_in_result(&self, array: NodeId, func: NodeId) -> bool {
        let (parent, child) = self.parent(array);
        match self.nodes.kind(parent) {
            AstKind::ReturnStatement(_) | AstKind::ArrowFunctionExpression(_) => true,
            AstKind::ObjectProperty(p)
                if p.kind == PropertyKind::Init && !p.method && p.value.span() == child =>
            {
                let object = self.nodes.parent_id(parent);
                let (up, _) = self.parent(object);
                matches!(
                    self.nodes.kind(up),
                    AstKind::ReturnStatement(_) | AstKind::ArrowFunctionExpression(_)
                )
            }
            AstKind::AssignmentExpression(a)
                if a.operator == AssignmentOperator::Assign && a.right.span() == child =>
            {
                let (up, _) = self.parent(parent);
                if !matches!(self.nodes.kind(up), AstKind::ExpressionStatement(_)) {
                    return false;
                }
                let target = match a.left.as_member_expression() {
                    Some(m) => m.object(),
                    None => return false,
                };
                let Expression::Identifier(r) = target else {
                    return false;
                };
                r.reference_id
                    .get()
                    .and_then(|r| self.scoping.get_reference(r).symbol_id())
                    .is_some_and(|sym| self.result_object(sym, func))
            }
            _ => false,
        }
    }

    /// `sym` is a local `{}` of `func` that is only written into
    /// (`sym[k] = v`) and returned.
    fn result_object(&self, sym: SymbolId, func: NodeId) -> bool {
        let decl = self.scoping.symbol_declaration(sym);
        let AstKind::VariableDeclarator(d) = self.nodes.kind(decl) else {
            return false;
        };
        let empty_literal =
            matches!(&d.init, Some(Expression::ObjectExpression(o)) if o.properties.is_empty());
        if !empty_literal || self.enclosing_function(decl) != Some(func) {
            return false;
        }
        self.scoping.get_resolved_references(sym).all(|r| {
            let id = r.node_id();
            if r.is_write() || self.enclosing_function(id) != Some(func) {
                return false;
            }
            let (parent, child) = self.parent(id);
            match self.nodes.kind(parent) {
                AstKind::ReturnStatement(_) | AstKind::ArrowFunctionExpression(_) => true,
                AstKind::StaticMemberExpression(m) if m.object.span() == child => {
                    self.assigned_to(parent, m.span)
                }
                AstKind::ComputedMemberExpression(m) if m.object.span() == child => {
                    self.assigned_to(parent, m.span)
                }
                _ => false,
            }
        })
    }

    /// The member expression at `member` is the target of a plain `=`.
    fn assigned_to(&self, member: NodeId, span: Span) -> bool {
        let (parent, child) = self.parent(member);
        child == span
            && matches!(self.nodes.kind(parent), AstKind::AssignmentExpression(a)
                if a.operator == AssignmentOperator::Assign && a.left.span() == child)
    }
}

enum Param {
    Absent,
    Simple(SymbolId),
    Other,
}

/// Parameter `i`: absent, a plain name without a default, or anything else.
fn param(params: &FormalParameters<'_>, i: usize) -> Param {
    if params.rest.is_some() {
        return Param::Other;
    }
    let Some(p) = params.items.get(i) else {
        return Param::Absent;
    };
    match p.pattern.get_binding_identifier() {
        Some(b) if p.initializer.is_none() && p.pattern.is_binding_identifier() => {
            b.symbol_id.get().map_or(Param::Other, Param::Simple)
        }
        _ => Param::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::{DOC, MARKER, META};
    use crate::script::transpile::transpile;

    /// The flags the marker gives `dispatch` in `body` (None: unmarked).
    fn flags(body: &str) -> Option<u8> {
        let src = format!(
            "declare const api: any, keep: any[], helper: any;\napi.configureSource('s', {{ dispatch: (doc: any, meta: any) => {{ {body} }} }});\n"
        );
        let code = transpile("t.ts", &src).unwrap().code;
        let at = code.find(&format!("{MARKER}("))?;
        let tail = &code[at..];
        let start = tail.find("}.dispatch, ").expect(&code) + "}.dispatch, ".len();
        let n = &tail[start..start + tail[start..].find(')').unwrap()];
        Some(n.trim().parse().unwrap())
    }

    fn assert_unmarked(flag: u8, body: &str) {
        assert_eq!(flags(body).unwrap_or(0) & flag, 0, "{body}");
    }

    #[test]
    fn the_seeds_dispatch_only_reads_doc_and_meta() {
        let src =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/userscripts/repl.ts"))
                .unwrap();
        let code = transpile("repl.ts", &src).unwrap().code;
        assert!(
            code.contains(&format!("dispatch: {MARKER}({{ dispatch: "))
                && code.contains("}.dispatch, 3)"),
            "{code}"
        );
    }

    #[test]
    fn reads_and_returned_literals_qualify() {
        let both = Some(DOC | META);
        assert_eq!(flags("return { [meta.table]: [doc] };"), both);
        assert_eq!(
            flags("const r = {}; if (doc.a === 1 && typeof doc.b !== 'string') r[meta.table] = [doc]; return r;"),
            both
        );
        assert_eq!(
            flags("return { t: [{ ...doc, k: meta.key[0], n: meta.key.length }] };"),
            both
        );
        assert_eq!(
            flags(
                "console.log(JSON.stringify(doc), JSON.stringify(meta), `${doc.v}`); return null;"
            ),
            both
        );
        assert_eq!(flags("return doc.v.toString() + meta.nanos;"), both);
        let arrow = transpile(
            "t.ts",
            "declare const api: any;\napi.configureSource('s', { dispatch: (doc, meta) => ({ [meta.table]: [doc] }) });\n",
        )
        .unwrap()
        .code;
        assert!(arrow.contains("}.dispatch, 3)"), "{arrow}");
    }

    #[test]
    fn changing_or_keeping_doc_disqualifies_it() {
        for body in [
            "doc.v = 1; return { t: [doc] };",
            "doc.v += 1; return null;",
            "doc.n++; return null;",
            "delete doc.v; return null;",
            "[doc.v] = [1]; return null;",
            "({ a: doc.v } = { a: 1 }); return null;",
            "for (doc.v of [1]) {} return null;",
            "Object.assign(doc, { v: 1 }); return null;",
            "helper(doc); return null;",
            "keep.push(doc); return null;",
            "const d = doc; d.v = 1; return null;",
            "const r = {}; r.t = [doc]; r.t[0].v = 1; return r;",
            "const r = { set t(v) { v[0].v = 1; } }; r.t = [doc]; return r;",
            "const a = [doc]; return { t: a };",
            "return { t: [doc], f: () => { doc.v = 1; } };",
            "arguments[0].v = 1; return null;",
            "doc.__defineGetter__('v', () => 1); return null;",
            "return doc || {};",
            "return { t: doc };",
            "if (doc instanceof K) {} return null;",
        ] {
            assert_unmarked(DOC, body);
        }
    }

    #[test]
    fn changing_or_keeping_meta_disqualifies_it() {
        for body in [
            "keep.push(meta); return null;",
            "meta.table = 'x'; return null;",
            "meta.extra = 1; return null;",
            "meta.key.push(1); return null;",
            "meta.key[0] = 2; return null;",
            "const k = meta.key; return null;",
            "return { t: [{ k: meta.key }] };",
            "return { t: [meta] };",
            "helper(meta); return null;",
            "const x = meta[doc.f]; return null;",
            "if (meta.key instanceof K) {} return null;",
        ] {
            assert_unmarked(META, body);
        }
    }

    #[test]
    fn only_dispatch_shaped_functions_are_marked() {
        let code = transpile(
            "t.ts",
            "export const route = (doc, meta) => null;\nfunction f() { return [1].map((x) => x); }\nconst o = { other: (doc) => null };\nasync function g() {}\nconst h = async (doc) => null;\n",
        )
        .unwrap()
        .code;
        assert_eq!(code.matches(MARKER).count(), 1, "{code}");
        assert!(
            code.contains(&format!(
                "{MARKER}({{ route: (doc, meta) => null }}.route, 3)"
            )),
            "{code}"
        );
    }
}
