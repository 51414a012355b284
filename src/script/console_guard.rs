//! Skips the work of building console messages nobody will read.
//!
//! Userscripts log per row, and the seed's `dispatch` does it with
//! `console.trace(JSON.stringify(doc), JSON.stringify(meta))`: JavaScript
//! evaluates those arguments before `console.trace` can see that tracing is
//! off, and in QuickJS they cost more than everything else the row needs.
//! Like the argument of a `tracing` macro, a console call's arguments are
//! therefore evaluated only when its level is enabled: the statement
//! `console.M(args);` becomes
//! `console.M.enabled !== false && console.M(args);`.
//!
//! Only statements whose arguments cannot change anything are rewritten, so
//! the script behaves as written: literals, names, property reads, operators
//! (not assignments, `++`, `delete`), templates, object and array literals,
//! `typeof`, and calls to `JSON.stringify` and `String`. Any other call in
//! an argument (which could have effects) keeps the statement as it is. A
//! console method the script replaced has no `enabled` property and is
//! always called.

use oxc::allocator::{Allocator, CloneIn, TakeIn};
use oxc::ast::ast::{
    Argument, ArrayExpressionElement, BinaryOperator, Expression, ExpressionStatement,
    IdentifierName, IdentifierReference, LogicalOperator, ObjectPropertyKind, Program, PropertyKey,
    UnaryOperator,
};
use oxc::ast::builder::AstBuilder;
use oxc::ast_visit::{walk_mut, VisitMut};

/// The console methods meridian's console defines.
const LEVELS: [&str; 6] = ["trace", "debug", "log", "info", "warn", "error"];

/// Rewrites every eligible console statement in `program`; returns how many.
pub fn guard_console_calls<'a>(allocator: &'a Allocator, program: &mut Program<'a>) -> usize {
    let mut pass = ConsoleGuard {
        ast: AstBuilder::new(allocator),
        allocator,
        rewritten: 0,
    };
    pass.visit_program(program);
    pass.rewritten
}

struct ConsoleGuard<'a> {
    ast: AstBuilder<'a>,
    allocator: &'a Allocator,
    rewritten: usize,
}

impl<'a> VisitMut<'a> for ConsoleGuard<'a> {
    fn visit_expression_statement(&mut self, it: &mut ExpressionStatement<'a>) {
        walk_mut::walk_expression_statement(self, it);
        let Expression::CallExpression(call) = &it.expression else {
            return;
        };
        let Expression::StaticMemberExpression(callee) = &call.callee else {
            return;
        };
        let is_console =
            matches!(&callee.object, Expression::Identifier(id) if id.name == "console");
        if !is_console
            || callee.optional
            || call.optional
            || !LEVELS.contains(&callee.property.name.as_str())
            || !call.arguments.iter().all(|a| match a {
                Argument::SpreadElement(_) => false,
                a => a.as_expression().is_some_and(effect_free),
            })
        {
            return;
        }
        let span = call.span;
        let method = call.callee.clone_in(self.allocator);
        let enabled = Expression::new_static_member_expression(
            span,
            method,
            IdentifierName::new(span, "enabled", &self.ast),
            false,
            &self.ast,
        );
        let test = Expression::new_binary_expression(
            span,
            enabled,
            BinaryOperator::StrictInequality,
            Expression::new_boolean_literal(span, false, &self.ast),
            &self.ast,
        );
        let call = it.expression.take_in(&self.ast);
        it.expression =
            Expression::new_logical_expression(span, test, LogicalOperator::And, call, &self.ast);
        self.rewritten += 1;
    }
}

/// Whether evaluating `e` can change nothing (getters and `toJSON` aside).
fn effect_free(e: &Expression<'_>) -> bool {
    match e {
        Expression::BooleanLiteral(_)
        | Expression::NullLiteral(_)
        | Expression::NumericLiteral(_)
        | Expression::BigIntLiteral(_)
        | Expression::StringLiteral(_)
        | Expression::Identifier(_)
        | Expression::ThisExpression(_) => true,
        Expression::TemplateLiteral(t) => t.expressions.iter().all(effect_free),
        Expression::StaticMemberExpression(m) => effect_free(&m.object),
        Expression::ComputedMemberExpression(m) => {
            effect_free(&m.object) && effect_free(&m.expression)
        }
        Expression::UnaryExpression(u) => {
            u.operator != UnaryOperator::Delete && effect_free(&u.argument)
        }
        Expression::BinaryExpression(b) => effect_free(&b.left) && effect_free(&b.right),
        Expression::LogicalExpression(l) => effect_free(&l.left) && effect_free(&l.right),
        Expression::ConditionalExpression(c) => {
            effect_free(&c.test) && effect_free(&c.consequent) && effect_free(&c.alternate)
        }
        Expression::ParenthesizedExpression(p) => effect_free(&p.expression),
        Expression::ArrayExpression(a) => a.elements.iter().all(|el| match el {
            ArrayExpressionElement::SpreadElement(_) => false,
            ArrayExpressionElement::Elision(_) => true,
            el => el.as_expression().is_some_and(effect_free),
        }),
        Expression::ObjectExpression(o) => o.properties.iter().all(|p| match p {
            ObjectPropertyKind::ObjectProperty(p) => {
                !p.method
                    && match &p.key {
                        PropertyKey::StaticIdentifier(_) | PropertyKey::PrivateIdentifier(_) => {
                            true
                        }
                        k => k.as_expression().is_some_and(effect_free),
                    }
                    && effect_free(&p.value)
            }
            ObjectPropertyKind::SpreadProperty(_) => false,
        }),
        Expression::CallExpression(c) => {
            let known = match &c.callee {
                Expression::Identifier(id) => id.name == "String",
                callee => json_stringify(callee).is_some(),
            };
            known
                && !c.optional
                && c.arguments.iter().all(|a| match a {
                    Argument::SpreadElement(_) => false,
                    a => a.as_expression().is_some_and(effect_free),
                })
        }
        _ => false,
    }
}

/// The `JSON` of a callee `JSON.stringify`, so a caller can tell whether it
/// is the global.
pub(super) fn json_stringify<'e, 'a>(
    callee: &'e Expression<'a>,
) -> Option<&'e IdentifierReference<'a>> {
    let Expression::StaticMemberExpression(m) = callee else {
        return None;
    };
    match &m.object {
        Expression::Identifier(id) if id.name == "JSON" && m.property.name == "stringify" => {
            Some(id)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::script::transpile::transpile;

    fn js(src: &str) -> String {
        transpile("t.ts", src).unwrap().code
    }

    #[test]
    fn guards_console_calls_whose_arguments_have_no_effects() {
        let code = js("declare const doc: any, meta: any;\nconsole.trace(JSON.stringify(doc), JSON.stringify(meta));\nconsole.log(\"Processing \" + doc.k + \"(\" + typeof doc.k + \"):\" + doc._source);\n");
        assert!(
            code.contains("console.trace.enabled !== false && console.trace(JSON.stringify(doc), JSON.stringify(meta))"),
            "{code}"
        );
        assert!(
            code.contains("console.log.enabled !== false && console.log("),
            "{code}"
        );
    }

    #[test]
    fn keeps_calls_whose_arguments_could_change_something() {
        let code = js("let n = 0;\nfunction f() { return n++; }\nconsole.log(f());\nconsole.log(n++);\nconsole.log(...[1]);\nconst x = console.log(1);\n");
        assert!(!code.contains("enabled"), "{code}");
    }
}
