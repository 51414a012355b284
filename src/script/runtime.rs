//! One QuickJS runtime with the user's script loaded: module loading (sandboxed
//! to the script's folder), limits, host functions, and calls into the batch
//! entry points of `bootstrap.js`. A [`Worker`] is `!Send`: it lives on one
//! thread of the engine's pool.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use rquickjs::function::Args;
use rquickjs::loader::{Loader, Resolver};
use rquickjs::{Context, Ctx, Function, Module, Object, Persistent, Runtime, Value};

use super::flat::FlatArray;

use super::transpile::{transpile, Transpiled};
use super::{Limits, ScriptError};

/// The name QuickJS knows the built-in API module by.
pub const API_MODULE: &str = "replicator@v1";
const BOOTSTRAP: &str = include_str!("bootstrap.js");
const API_MODULE_SOURCE: &str = r#"
const api = globalThis.__meridian.api;
export const configureSource = api.configureSource;
export const configureTable = api.configureTable;
export const standardMerge = api.standardMerge;
export const getTX = api.getTX;
export const randomUUID = api.randomUUID;
export const setOptions = api.setOptions;
export const replicationKey = api.replicationKey;
export default api;
"#;

/// The script and every module it imports, transpiled, with imports checked.
#[derive(Debug)]
pub struct Program {
    /// The entry module's name (its file name).
    pub entry: String,
    /// Modules by name (path relative to the script's folder, `/`-separated).
    pub modules: HashMap<String, Transpiled>,
}

/// One argument of a call into `bootstrap.js`.
pub enum Arg {
    /// A string: JSON for the entry point to parse, or a name.
    Text(String),
    /// Rows as values (see [`FlatArray`]).
    Flat(FlatArray),
}

impl From<String> for Arg {
    fn from(s: String) -> Self {
        Arg::Text(s)
    }
}

/// Resolves an import specifier against the importing module. `exists` says
/// whether a module name (relative path) is a file in the script's folder.
pub fn resolve_specifier(
    base: &str,
    spec: &str,
    exists: impl Fn(&str) -> bool,
) -> Result<String, String> {
    if spec == "replicator@v1" || spec == "cdc-sink@v1" {
        return Ok(API_MODULE.to_string());
    }
    if spec.is_empty() || spec.contains(':') || spec.starts_with('/') || spec.contains('\\') {
        return Err(format!(
            "cannot import {spec:?}: only replicator@v1, cdc-sink@v1 and .ts/.js files beside the script can be imported"
        ));
    }
    let relative = spec.starts_with("./") || spec.starts_with("../");
    let mut parts: Vec<&str> = Vec::new();
    if relative {
        parts.extend(base.split('/'));
        parts.pop();
    }
    for p in spec.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!(
                        "cannot import {spec:?}: it is outside the script's folder"
                    ));
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    let candidates: Vec<String> =
        if joined.ends_with(".ts") || joined.ends_with(".js") || joined.ends_with(".mjs") {
            vec![joined.clone()]
        } else {
            vec![format!("{joined}.ts"), format!("{joined}.js")]
        };
    candidates
        .iter()
        .find(|c| exists(c))
        .cloned()
        .ok_or_else(|| {
            format!(
                "cannot find module {spec:?} (looked for {})",
                candidates.join(", ")
            )
        })
}

/// Reads and transpiles the script at `path` and everything it imports.
pub fn load_program(path: &Path) -> Result<Program, ScriptError> {
    let display = path.display().to_string();
    let root = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let root = root
        .canonicalize()
        .map_err(|e| ScriptError::Load(format!("{display}: {e}")))?;
    let entry = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ScriptError::Load(format!("{display}: not a file name")))?
        .to_string();
    let exists = |name: &str| -> bool {
        let p = root.join(name);
        match p.canonicalize() {
            Ok(c) => c.starts_with(&root) && c.is_file(),
            Err(_) => false,
        }
    };
    let read = |name: &str| -> Result<Transpiled, ScriptError> {
        let source = std::fs::read_to_string(root.join(name))
            .map_err(|e| ScriptError::Load(format!("{name}: {e}")))?;
        transpile(name, &source).map_err(ScriptError::Load)
    };
    let mut modules = HashMap::new();
    let first = if exists(&entry) {
        read(&entry)?
    } else {
        let source = std::fs::read_to_string(path)
            .map_err(|e| ScriptError::Load(format!("{display}: {e}")))?;
        transpile(&entry, &source).map_err(ScriptError::Load)?
    };
    let mut queue = vec![first];
    while let Some(m) = queue.pop() {
        for (spec, line, col) in &m.imports {
            let name = resolve_specifier(&m.name, spec, exists)
                .map_err(|e| ScriptError::Load(format!("{}:{line}:{col}: {e}", m.name)))?;
            if name != API_MODULE
                && name != entry
                && !modules.contains_key(&name)
                && !queue.iter().any(|q: &Transpiled| q.name == name)
            {
                queue.push(read(&name)?);
            }
        }
        modules.insert(m.name.clone(), m);
    }
    Ok(Program { entry, modules })
}

struct ProgramResolver(Arc<Program>);

impl Resolver for ProgramResolver {
    fn resolve<'js>(&mut self, ctx: &Ctx<'js>, base: &str, name: &str) -> rquickjs::Result<String> {
        let modules = &self.0.modules;
        resolve_specifier(base, name, |n| modules.contains_key(n))
            .map_err(|e| rquickjs::Exception::throw_reference(ctx, &e))
    }
}

struct ProgramLoader(Arc<Program>);

impl Loader for ProgramLoader {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
    ) -> rquickjs::Result<Module<'js, rquickjs::module::Declared>> {
        if name == API_MODULE {
            return Module::declare(ctx.clone(), API_MODULE, API_MODULE_SOURCE);
        }
        match self.0.modules.get(name) {
            Some(m) => Module::declare(ctx.clone(), name, m.code.clone()),
            None => Err(rquickjs::Exception::throw_reference(
                ctx,
                &format!("cannot find module {name:?}"),
            )),
        }
    }
}

/// A request from a script's `getTX()` to the caller that owns the transaction.
pub struct TxRequest {
    pub kind: TxKind,
    pub sql: String,
    /// JSON: the arguments (exec/query) or the operations (apply).
    pub args_json: String,
    /// The answer: JSON of the result, or an error message.
    pub reply: std::sync::mpsc::Sender<Result<String, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxKind {
    Exec,
    Query,
    Apply,
}

/// What an `apply` call needs besides its operations.
pub struct TxBridge {
    pub requests: tokio::sync::mpsc::UnboundedSender<TxRequest>,
    pub columns_json: String,
    pub schema: String,
    pub table: String,
}

struct State {
    script: String,
    deadline: Cell<Option<Instant>>,
    interrupted: Cell<bool>,
    tx: RefCell<Option<tokio::sync::mpsc::UnboundedSender<TxRequest>>>,
}

/// A runtime with the script loaded.
pub struct Worker {
    // Field order matters: JS handles, then the context, then the runtime.
    native: Option<Persistent<Object<'static>>>,
    ctx: Context,
    rt: Runtime,
    state: Rc<State>,
    program: Arc<Program>,
    limits: Limits,
    /// The console level the script's `console.X.enabled` flags reflect.
    level: i32,
}

/// The tracing level a console method maps to (0 trace … 4 error).
fn level_enabled(level: i32) -> bool {
    use tracing::Level;
    match level {
        0 => tracing::enabled!(target: "meridian::userscript", Level::TRACE),
        1 => tracing::enabled!(target: "meridian::userscript", Level::DEBUG),
        2 => tracing::enabled!(target: "meridian::userscript", Level::INFO),
        3 => tracing::enabled!(target: "meridian::userscript", Level::WARN),
        _ => tracing::enabled!(target: "meridian::userscript", Level::ERROR),
    }
}

fn min_level() -> i32 {
    (0..5).find(|l| level_enabled(*l)).unwrap_or(5)
}

fn log(script: &str, level: i32, msg: &str) {
    match level {
        0 => tracing::trace!(target: "meridian::userscript", script, "{msg}"),
        1 => tracing::debug!(target: "meridian::userscript", script, "{msg}"),
        2 => tracing::info!(target: "meridian::userscript", script, "{msg}"),
        3 => tracing::warn!(target: "meridian::userscript", script, "{msg}"),
        _ => tracing::error!(target: "meridian::userscript", script, "{msg}"),
    }
}

impl Worker {
    /// Creates a runtime, loads the program and runs its top level. With
    /// `quiet`, console output of the top level is suppressed (pool workers
    /// after the first). Returns the worker and the configuration as JSON.
    pub fn new(
        program: Arc<Program>,
        limits: Limits,
        quiet: bool,
    ) -> Result<(Worker, String), ScriptError> {
        let rt = Runtime::new_with_alloc(super::alloc::MiAllocator)
            .map_err(|e| ScriptError::Load(format!("cannot start QuickJS: {e}")))?;
        rt.set_memory_limit(limits.memory_bytes);
        rt.set_max_stack_size(1 << 20);
        let state = Rc::new(State {
            script: program.entry.clone(),
            deadline: Cell::new(None),
            interrupted: Cell::new(false),
            tx: RefCell::new(None),
        });
        {
            let state = state.clone();
            rt.set_interrupt_handler(Some(Box::new(move || match state.deadline.get() {
                Some(d) if Instant::now() >= d => {
                    state.interrupted.set(true);
                    true
                }
                _ => false,
            })));
        }
        rt.set_loader(
            ProgramResolver(program.clone()),
            ProgramLoader(program.clone()),
        );
        let ctx = Context::full(&rt)
            .map_err(|e| ScriptError::Load(format!("cannot start QuickJS: {e}")))?;
        let mut worker = Worker {
            ctx,
            rt,
            native: None,
            state,
            program,
            limits,
            level: if quiet { 5 } else { min_level() },
        };
        let setup = worker
            .ctx
            .with(|ctx| -> rquickjs::Result<Persistent<Object<'static>>> {
                let native = Object::new(ctx.clone())?;
                let st = worker.state.clone();
                native.set(
                    "log",
                    Function::new(ctx.clone(), move |level: i32, msg: String| {
                        log(&st.script, level, &msg)
                    })?,
                )?;
                native.set(
                    "uuid",
                    Function::new(ctx.clone(), || uuid::Uuid::new_v4().to_string())?,
                )?;
                let st = worker.state.clone();
                native.set(
                    "tx",
                    Function::new(
                        ctx.clone(),
                        move |ctx: Ctx<'_>, kind: String, sql: String, args: String| {
                            tx_call(&st, &ctx, &kind, sql, args)
                        },
                    )?,
                )?;
                native.set("level", worker.level)?;
                ctx.globals().set("__meridian_native", native.clone())?;
                ctx.eval::<(), _>(BOOTSTRAP)?;
                Ok(Persistent::save(&ctx, native))
            });
        let native = setup
            .map_err(|e| ScriptError::Load(format!("cannot start the userscript API: {e}")))?;
        worker.native = Some(native);

        // Run the top level.
        let entry = worker.program.entry.clone();
        let code = worker.program.modules[&entry].code.clone();
        worker.arm();
        let res = worker.ctx.with(|ctx| -> Result<String, ScriptError> {
            let run = || -> rquickjs::Result<()> {
                let module = Module::declare(ctx.clone(), entry.clone(), code)?;
                let (_module, promise) = module.eval()?;
                while promise.state() == rquickjs::promise::PromiseState::Pending {
                    if !ctx.execute_pending_job() {
                        break;
                    }
                }
                match promise.result::<Value>() {
                    Some(r) => r.map(|_| ()),
                    None => Ok(()),
                }
            };
            run().map_err(|e| worker.error(&ctx, e))?;
            let describe: Function = ctx
                .globals()
                .get::<_, Object>("__meridian")
                .and_then(|m| m.get("describe"))
                .map_err(|e| ScriptError::Load(e.to_string()))?;
            describe
                .call::<_, String>(())
                .map_err(|e| worker.error(&ctx, e))
        });
        worker.disarm();
        match res {
            Ok(config) => Ok((worker, config)),
            Err(ScriptError::Exception(m)) => Err(ScriptError::Load(m)),
            Err(ScriptError::Timeout(d)) => Err(ScriptError::Load(format!(
                "{}: the top level ran longer than {d:?}",
                worker.program.entry
            ))),
            Err(ScriptError::OutOfMemory(m)) => Err(ScriptError::Load(format!(
                "{}: out of memory running the top level: {m}",
                worker.program.entry
            ))),
            Err(e) => Err(e),
        }
    }

    fn arm(&self) {
        self.state.interrupted.set(false);
        self.state
            .deadline
            .set(Some(Instant::now() + self.limits.call_timeout));
    }

    fn disarm(&self) {
        self.state.deadline.set(None);
    }

    /// Calls `__meridian[func](args...)`; a returned promise is driven until it
    /// settles. With `tx`, `getTX()` is serviced through the bridge.
    pub fn call(
        &mut self,
        func: &str,
        args: Vec<Arg>,
        tx: Option<TxBridge>,
    ) -> Result<String, ScriptError> {
        let level = min_level();
        self.arm();
        *self.state.tx.borrow_mut() = tx.as_ref().map(|t| t.requests.clone());
        let native = self.native.clone();
        let mut shown = self.level;
        let res = self.ctx.with(|ctx| -> Result<String, ScriptError> {
            // The flags are data properties, rewritten only on a change.
            if level != shown {
                if let Some(n) = native.and_then(|n| n.restore(&ctx).ok()) {
                    if let Ok(set) = n.get::<_, Function>("setLevel") {
                        if set.call::<_, ()>((level,)).is_ok() {
                            shown = level;
                        }
                    }
                }
            }
            let m: Object = ctx
                .globals()
                .get("__meridian")
                .map_err(|e| ScriptError::Invalid(e.to_string()))?;
            let f: Function = m
                .get(func)
                .map_err(|e| ScriptError::Invalid(e.to_string()))?;
            let mut a = args;
            if let Some(t) = &tx {
                a.push(Arg::Text(t.columns_json.clone()));
                a.push(Arg::Text(t.schema.clone()));
                a.push(Arg::Text(t.table.clone()));
            }
            let params = || -> rquickjs::Result<Args> {
                let mut params = Args::new(ctx.clone(), a.len());
                for arg in a {
                    match arg {
                        Arg::Text(s) => params.push_arg(s)?,
                        Arg::Flat(f) => params.push_arg(f.into_array(&ctx)?)?,
                    }
                }
                Ok(params)
            };
            // Promises the call started and did not return or await (an
            // async forEach in apply, a stray .then in dispatch) finish now,
            // under this call's deadline and in this request's transaction:
            // left queued, they would run inside the next apply on this
            // runtime, where getTX() answers for another request.
            let settle_stray = || -> rquickjs::Result<()> {
                while ctx.execute_pending_job() {}
                if self.state.interrupted.get() {
                    return Err(rquickjs::Exception::throw_message(&ctx, "interrupted"));
                }
                Ok(())
            };
            let run = || -> rquickjs::Result<String> {
                let v: Value = f.call_arg(params()?)?;
                if let Some(p) = v.as_promise() {
                    loop {
                        if let Some(r) = p.result::<String>() {
                            settle_stray()?;
                            return r;
                        }
                        if !ctx.execute_pending_job() {
                            // Nothing left to run and still pending: it never settles.
                            if let Some(r) = p.result::<String>() {
                                return r;
                            }
                            return Err(rquickjs::Exception::throw_message(
                                &ctx,
                                "the promise returned by apply never settled",
                            ));
                        }
                    }
                }
                settle_stray()?;
                if v.is_undefined() || v.is_null() {
                    return Ok("null".to_string());
                }
                <String as rquickjs::FromJs>::from_js(&ctx, v)
            };
            let out = run().map_err(|e| self.error(&ctx, e));
            if tx.is_some() {
                if let Ok(end) = m.get::<_, Function>("endApply") {
                    let _ = end.call::<_, ()>(());
                }
            }
            out
        });
        self.level = shown;
        *self.state.tx.borrow_mut() = None;
        self.disarm();
        res
    }

    /// Turns a QuickJS error into a [`ScriptError`], with positions mapped
    /// back into the original sources.
    fn error(&self, ctx: &Ctx<'_>, e: rquickjs::Error) -> ScriptError {
        if self.state.interrupted.get() {
            return ScriptError::Timeout(self.limits.call_timeout);
        }
        match e {
            rquickjs::Error::Allocation => ScriptError::OutOfMemory(format!(
                "{}: the script's heap reached its limit of {} bytes",
                self.program.entry, self.limits.memory_bytes
            )),
            rquickjs::Error::Exception => {
                let v = ctx.catch();
                // A heap at its limit can leave no room for the "out of
                // memory" error itself: QuickJS then throws null. A script's
                // own `throw null` reads the same; both restart the runtime,
                // and the message says which it may be.
                if v.is_null() {
                    return ScriptError::OutOfMemory(format!(
                        "{}: the script threw null (what an allocation at the heap's limit of {} bytes leaves)",
                        self.program.entry, self.limits.memory_bytes
                    ));
                }
                let (text, stack) = describe_thrown(ctx, &v);
                if text.contains("out of memory") {
                    return ScriptError::OutOfMemory(format!(
                        "{}: the script's heap reached its limit of {} bytes",
                        self.program.entry, self.limits.memory_bytes
                    ));
                }
                if text.contains("interrupted") && self.state.interrupted.get() {
                    return ScriptError::Timeout(self.limits.call_timeout);
                }
                let (pos, mapped) = map_stack(&self.program, &stack);
                if !mapped.is_empty() {
                    tracing::debug!(target: "meridian::userscript", script = %self.program.entry, "{text}\n{mapped}");
                }
                match pos {
                    Some(p) => ScriptError::Exception(format!("{p}: {text}")),
                    None => ScriptError::Exception(text),
                }
            }
            other => ScriptError::Exception(format!("{}: {other}", self.program.entry)),
        }
    }

    /// Whether this runtime should be replaced after `e` (its state may be
    /// inconsistent after an interrupted or out-of-memory call).
    pub fn needs_restart(e: &ScriptError) -> bool {
        matches!(e, ScriptError::Timeout(_) | ScriptError::OutOfMemory(_))
    }

    /// Memory the runtime uses now, in bytes.
    #[allow(dead_code)]
    pub fn memory_used(&self) -> i64 {
        self.rt.memory_usage().memory_used_size
    }
}

/// The thrown value as `Name: message` and its stack (empty when none).
fn describe_thrown<'js>(ctx: &Ctx<'js>, v: &Value<'js>) -> (String, String) {
    if let Some(obj) = v.as_object() {
        if v.is_error() || obj.contains_key("stack").unwrap_or(false) {
            let name: String = obj
                .get::<_, Option<String>>("name")
                .ok()
                .flatten()
                .unwrap_or_else(|| "Error".into());
            let message: String = obj
                .get::<_, Option<String>>("message")
                .ok()
                .flatten()
                .unwrap_or_default();
            let stack: String = obj
                .get::<_, Option<String>>("stack")
                .ok()
                .flatten()
                .unwrap_or_default();
            let text = if message.is_empty() {
                name
            } else {
                format!("{name}: {message}")
            };
            return (text, stack);
        }
    }
    let text = ctx
        .json_stringify(v.clone())
        .ok()
        .flatten()
        .and_then(|s| s.to_string().ok())
        .unwrap_or_else(|| "undefined".to_string());
    let text = match v.as_string() {
        Some(s) => s.to_string().unwrap_or(text),
        None => text,
    };
    (format!("uncaught {text}"), String::new())
}

/// Rewrites `file:line:col` positions of a QuickJS stack into the original
/// sources. Returns the first position inside the user's modules and the
/// rewritten stack.
pub fn map_stack(program: &Program, stack: &str) -> (Option<String>, String) {
    let mut first = None;
    let mut out = Vec::new();
    for line in stack.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let loc = match (trimmed.rfind('('), trimmed.ends_with(')')) {
            (Some(i), true) => &trimmed[i + 1..trimmed.len() - 1],
            _ => trimmed.strip_prefix("at ").unwrap_or(trimmed),
        };
        let mut parts = loc.rsplitn(3, ':');
        let (col, ln, file) = (parts.next(), parts.next(), parts.next());
        let mapped = match (
            file,
            ln.and_then(|l| l.parse().ok()),
            col.and_then(|c| c.parse().ok()),
        ) {
            (Some(file), Some(l), Some(c)) => program
                .modules
                .get(file)
                .and_then(|m| m.map.lookup(l, c))
                .map(|(sl, sc)| format!("{file}:{sl}:{sc}")),
            _ => None,
        };
        match mapped {
            Some(pos) => {
                if first.is_none() {
                    first = Some(pos.clone());
                }
                out.push(trimmed.replace(loc, &pos));
            }
            None => out.push(trimmed.to_string()),
        }
    }
    (first, out.join("\n"))
}

fn tx_call(
    state: &State,
    ctx: &Ctx<'_>,
    kind: &str,
    sql: String,
    args: String,
) -> rquickjs::Result<String> {
    let kind = match kind {
        "exec" => TxKind::Exec,
        "query" => TxKind::Query,
        _ => TxKind::Apply,
    };
    let sender = state.tx.borrow().clone();
    let Some(sender) = sender else {
        return Err(rquickjs::Exception::throw_message(
            ctx,
            "the transaction is no longer available: getTX() objects live only while apply runs",
        ));
    };
    let (reply, answer) = std::sync::mpsc::channel();
    let started = Instant::now();
    if sender
        .send(TxRequest {
            kind,
            sql,
            args_json: args,
            reply,
        })
        .is_err()
    {
        return Err(rquickjs::Exception::throw_message(
            ctx,
            "the request's transaction has ended",
        ));
    }
    let res = answer.recv();
    // Time spent in the database does not count against the script.
    if let Some(d) = state.deadline.get() {
        state.deadline.set(Some(d + started.elapsed()));
    }
    match res {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(msg)) => Err(rquickjs::Exception::throw_message(ctx, &msg)),
        Err(_) => Err(rquickjs::Exception::throw_message(
            ctx,
            "the request's transaction has ended",
        )),
    }
}
