// The userscript API (`replicator@v1` / `cdc-sink@v1`) and the batch entry
// points meridian calls. Evaluated once per runtime, before the user's script,
// with `__meridian_native` holding the host functions (log, uuid, tx, level).
(function (native) {
  "use strict";
  const STANDARD = Symbol("standardMerge");
  const reg = {
    sources: Object.create(null),
    tables: Object.create(null),
    options: Object.create(null),
    tx: null,
  };

  // ---- console ----------------------------------------------------------
  function show(v) {
    if (typeof v === "string") return v;
    if (v === undefined) return "undefined";
    if (v instanceof Error) return String(v);
    if (typeof v === "function") return "[function " + (v.name || "anonymous") + "]";
    if (typeof v === "bigint" || typeof v === "symbol") return String(v);
    try {
      const s = JSON.stringify(v);
      return s === undefined ? String(v) : s;
    } catch (e) {
      return String(v);
    }
  }
  const levels = { trace: 0, debug: 1, log: 2, info: 2, warn: 3, error: 4 };
  const console = {};
  const methods = [];
  for (const name of Object.keys(levels)) {
    const lvl = levels[name];
    const method = function (...args) {
      // Cheap when the daemon's log level filters this level out.
      if (lvl < native.level) return;
      let msg = "";
      for (let i = 0; i < args.length; i++) msg += (i ? " " : "") + show(args[i]);
      native.log(lvl, msg);
    };
    // Read by the guard transpiling puts before console statements (see
    // console_guard.rs), so their arguments are built only when logged. A
    // data property (read-only to scripts), set again by `native.setLevel`
    // when the daemon's level changes: a getter would be a function call
    // per console statement per row.
    Object.defineProperty(method, "enabled", { value: lvl >= native.level, configurable: true });
    methods.push([method, lvl]);
    console[name] = method;
  }
  native.setLevel = function (level) {
    native.level = level;
    for (const [m, lvl] of methods) Object.defineProperty(m, "enabled", { value: lvl >= level });
  };
  Object.defineProperty(globalThis, "console", {
    value: console,
    writable: true,
    configurable: true,
    enumerable: false,
  });

  // ---- configuration ----------------------------------------------------
  function fail(msg) {
    throw new TypeError(msg);
  }
  function isObj(v) {
    return v !== null && typeof v === "object" && !Array.isArray(v);
  }
  function isStrings(v) {
    return Array.isArray(v) && v.every((x) => typeof x === "string");
  }
  function q(s) {
    return JSON.stringify(s);
  }

  function configureSource(name, props) {
    if (typeof name !== "string" || name === "")
      fail("configureSource: the source name must be a non-empty string");
    const where = "configureSource(" + q(name) + "): ";
    if (!isObj(props)) fail(where + "the second argument must be an object");
    const hasDispatch = props.dispatch !== undefined;
    const hasTarget = props.target !== undefined;
    if (hasDispatch === hasTarget) fail(where + "give exactly one of dispatch or target");
    if (hasDispatch && typeof props.dispatch !== "function")
      fail(where + "dispatch must be a function");
    if (hasTarget && (typeof props.target !== "string" || props.target === ""))
      fail(where + "target must be a table name");
    const d = props.deletesTo;
    if (d !== undefined && d !== null && typeof d !== "string" && typeof d !== "function")
      fail(where + "deletesTo must be a table name or a function");
    for (const k of Object.keys(props)) {
      if (!["dispatch", "deletesTo", "target", "recurse"].includes(k))
        fail(where + "unknown property " + k);
    }
    reg.sources[name] = { dispatch: props.dispatch, deletesTo: d, target: props.target };
  }

  const TABLE_KEYS = ["apply", "cas", "deadlines", "deleteKey", "exprs", "extras", "ignore", "map", "merge", "rowLimit"];
  function configureTable(name, props) {
    if (typeof name !== "string" || name === "")
      fail("configureTable: the table name must be a non-empty string");
    const where = "configureTable(" + q(name) + "): ";
    if (props === undefined) props = {};
    if (!isObj(props)) fail(where + "the second argument must be an object");
    for (const k of Object.keys(props)) {
      if (!TABLE_KEYS.includes(k)) fail(where + "unknown property " + k);
    }
    const p = props;
    if (p.apply !== undefined && typeof p.apply !== "function") fail(where + "apply must be a function");
    if (p.cas !== undefined && !isStrings(p.cas)) fail(where + "cas must be an array of column names");
    if (p.deadlines !== undefined) {
      if (!isObj(p.deadlines)) fail(where + "deadlines must map columns to durations such as \"1h\"");
      for (const [c, v] of Object.entries(p.deadlines)) {
        if (typeof v !== "string") fail(where + "deadline for " + c + " must be a duration string such as \"1h\"");
      }
    }
    if (p.deleteKey !== undefined && typeof p.deleteKey !== "function" && !isStrings(p.deleteKey))
      fail(where + "deleteKey must be a function or an array of column names");
    if (p.exprs !== undefined) {
      if (!isObj(p.exprs)) fail(where + "exprs must map columns to SQL expressions");
      for (const [c, v] of Object.entries(p.exprs)) {
        if (typeof v !== "string") fail(where + "expression for " + c + " must be a string");
      }
    }
    if (p.extras !== undefined && typeof p.extras !== "string") fail(where + "extras must be a column name");
    if (p.ignore !== undefined && !isObj(p.ignore) && !isStrings(p.ignore))
      fail(where + "ignore must map columns to true (or list columns)");
    if (p.map !== undefined && typeof p.map !== "function") fail(where + "map must be a function");
    if (p.merge !== undefined && typeof p.merge !== "function" && !(isObj(p.merge) && p.merge[STANDARD]))
      fail(where + "merge must be a function or standardMerge(...)");
    if (p.rowLimit !== undefined && !(Number.isInteger(p.rowLimit) && p.rowLimit > 0))
      fail(where + "rowLimit must be a positive integer");
    reg.tables[name] = Object.assign({}, p);
  }

  function standardMerge(fallback) {
    if (fallback !== undefined && fallback !== null && typeof fallback !== "function")
      fail("standardMerge: the fallback must be a function");
    return Object.freeze({ [STANDARD]: true, fallback: fallback || null });
  }

  function getTX() {
    if (reg.tx === null) throw new Error("getTX() may only be called while a table's apply function runs");
    return reg.tx;
  }

  function setOptions(opts) {
    if (!isObj(opts)) fail("setOptions: the argument must be an object of flag names to values");
    for (const [k, v] of Object.entries(opts)) reg.options[k] = String(v);
  }

  const api = Object.freeze({
    configureSource,
    configureTable,
    standardMerge,
    getTX,
    randomUUID: () => native.uuid(),
    setOptions,
    // `meta[replicationKey]` holds the changed row's primary key values.
    replicationKey: "key",
  });

  // ---- what meridian calls ---------------------------------------------
  function ignoreList(ig) {
    if (ig === undefined) return [];
    if (Array.isArray(ig)) return ig;
    return Object.keys(ig).filter((k) => ig[k]);
  }

  function describe() {
    const out = { sources: {}, tables: {}, options: Object.assign({}, reg.options) };
    for (const k of Object.keys(reg.sources)) {
      const s = reg.sources[k];
      out.sources[k] = {
        dispatch: typeof s.dispatch === "function",
        deletesTo: typeof s.deletesTo === "string" ? s.deletesTo : null,
        deletesToFn: typeof s.deletesTo === "function",
        target: s.target === undefined ? null : s.target,
      };
    }
    for (const k of Object.keys(reg.tables)) {
      const t = reg.tables[k];
      let merge = null;
      if (typeof t.merge === "function") merge = "custom";
      else if (t.merge) merge = t.merge.fallback ? "standard+fallback" : "standard";
      out.tables[k] = {
        apply: typeof t.apply === "function",
        cas: t.cas || [],
        deadlines: t.deadlines || {},
        deleteKey: Array.isArray(t.deleteKey) ? t.deleteKey : [],
        deleteKeyFn: typeof t.deleteKey === "function",
        exprs: t.exprs || {},
        extras: t.extras === undefined ? null : t.extras,
        ignore: ignoreList(t.ignore),
        map: typeof t.map === "function",
        merge,
        rowLimit: t.rowLimit === undefined ? null : t.rowLimit,
      };
    }
    return JSON.stringify(out);
  }

  // Two functions per property list, generated once: `make` builds a
  // document from its values (an object literal: faster than defining
  // properties one by one) and `same` tells whether a document still has
  // exactly those properties and values (static property reads: a computed
  // read hashes the name every time). Both read the values from the flat
  // input array `a` at offset `o`.
  // Taken now, before a script can replace them.
  const NewFunction = Function;
  const ObjectProto = Object.prototype;
  const protoOf = Object.getPrototypeOf;
  const keysOf = Object.keys;
  const isArray = Array.isArray;
  const makers = new Map();
  const IDENT = /^[A-Za-z_$][A-Za-z0-9_$]*$/;

  // QuickJS frees an object's shape (its property layout) with the last
  // object using it, and an object literal passes through one shape per
  // property: with nothing holding them, every row would build the whole
  // chain again (clone, grow, rehash). One object per prefix of a property
  // list keeps each shape alive, so later literals only look them up.
  function keepShapes(cols) {
    const kept = [];
    for (let j = 1; j <= cols.length; j++) {
      const o = {};
      for (let i = 0; i < j; i++) o[cols[i]] = null;
      kept.push(o);
    }
    return kept;
  }
  // Held by `reg` (which the entry points use), so they live as long as the
  // runtime. The prefixes cover the meta of rows without a key too.
  reg.metaShapes = keepShapes(["schema", "table", "nanos", "logical", "key"]);
  function maker(cols) {
    const id = JSON.stringify(cols);
    let f = makers.get(id);
    if (f === undefined) {
      let make = "return {";
      let same = "return protoOf(d) === ObjectProto && keysOf(d).length === " + cols.length;
      for (let j = 0; j < cols.length; j++) {
        const name = JSON.stringify(cols[j]);
        make += (j ? "," : "") + name + ":a[o+" + j + "]";
        same += " && d" + (IDENT.test(cols[j]) ? "." + cols[j] : "[" + name + "]") + " === a[o+" + j + "]";
      }
      f = {
        shapes: keepShapes(cols),
        make: new NewFunction("a", "o", make + "};"),
        same: new NewFunction("protoOf", "ObjectProto", "keysOf", "return function (d, a, o) { " + same + "; };")(
          protoOf,
          ObjectProto,
          keysOf
        ),
      };
      if (makers.size >= 256) makers.clear();
      makers.set(id, f);
    }
    return f;
  }

  // Flags the transpiler proved for a dispatch function (see
  // readonly_params.rs): 1, it never changes `doc` in place nor keeps it
  // outside its result; 2, it never changes or keeps `meta`.
  const READ_ONLY_DOC = 1;
  const READ_ONLY_META = 2;
  const readOnly = new WeakMap();
  Object.defineProperty(globalThis, "__meridianReadOnly", {
    value: function (f, flags) {
      if (typeof f === "function") readOnly.set(f, flags | 0);
      return f;
    },
  });
  function readOnlyFlags(f) {
    return readOnly.get(f) | 0;
  }
  function unchanged() {
    return true;
  }

  function isPlain(v) {
    if (v === null || typeof v !== "object") return false;
    const p = protoOf(v);
    return p === ObjectProto || p === null;
  }

  // A dispatch result JSON would carry as {} or drop (a Promise, a Map, a
  // class instance without toJSON, a function) would lose its rows without
  // a word: it fails the batch, naming what came back.
  function routable(v, key, row) {
    let what;
    if (typeof v === "function") what = "a function";
    else if (v === null || typeof v !== "object" || isArray(v) || isPlain(v) || typeof v.toJSON === "function") return v;
    else {
      const c = v.constructor;
      const name = typeof c === "function" && typeof c.name === "string" && c.name !== "" ? c.name : "Object";
      what = name === "Promise" ? "a Promise (dispatch must not be async)" : "a " + name;
    }
    throw new TypeError(
      "dispatch for source " + key + " returned " + what + " for row " + row + "; expected {table: [documents]} or null"
    );
  }

  // A dispatch result with each document that is the row's own, unchanged,
  // replaced by 0 and every other one wrapped as [document].
  // `kept`: whether the document is unchanged, when the caller already
  // checked (undefined: not yet).
  function encodeRouted(v, doc, same, a, o, kept) {
    if (v === undefined) return null;
    if (!isPlain(v) || typeof v.toJSON === "function") return v;
    const out = Object.create(null);
    for (const t of keysOf(v)) {
      const list = v[t];
      if (!isArray(list)) {
        out[t] = list;
        continue;
      }
      const l = new Array(list.length);
      for (let k = 0; k < list.length; k++) {
        const d = list[k];
        if (d === doc) {
          if (kept === undefined) kept = same(doc, a, o);
          l[k] = kept ? 0 : [d];
        } else l[k] = [d];
      }
      out[t] = l;
    }
    return out;
  }

  // json: [schema, shapes, topics, times, positions, offset], where `times`
  // holds nanos, logical pairs and `positions` each row's index in the batch
  // (null when they are offset, offset + 1, …: every row of the batch, or
  // of its part, is here); `a` (built by flat.rs) the rows one after
  // another: a header (shape, isDelete (0/1), topic, time (a pair's index),
  // the number of key values (-1: none); or -2 for the previous row's), the
  // key values, then the document: its values in the order of
  // shapes[shape], or (shape -1) the document itself.
  // output: [tables, codes, results], one code per row: -1 when the row
  // goes nowhere (null or {}), t >= 0 when it goes to tables[t] as its own
  // unchanged document (the common case, sent as one number), and -2 - i
  // for anything else, results[i] being the result, with the row's own
  // documents encoded by encodeRouted when it was sent by shape.
  function dispatchBatch(key, json, a) {
    const s = reg.sources[key];
    const input = JSON.parse(json);
    const schema = input[0];
    const shapes = input[1];
    const topics = input[2];
    const times = input[3];
    // Each row's index in the batch (null: the same as here).
    const positions = input[4];
    const offset = input[5];
    const fns = shapes.map(maker);
    const tables = [];
    const codes = [];
    const results = [];
    // Rows so far; the last table a row went to, and its index.
    let nc = 0;
    let lastName = null;
    let lastT = -1;
    // QuickJS reads an array through a double index by converting it to a
    // property name (number to string, then an atom lookup): `| 0` keeps `o`
    // and every index a small integer, which takes the fast array path.
    let o = 0;
    let held;
    const roDispatch = readOnlyFlags(s.dispatch);
    const roDeletes = readOnlyFlags(s.deletesTo);
    // For functions that can neither change nor keep it, one meta per
    // header, reused row after row (only its key values change).
    let shared = null;
    let sharedKey = null;
    // f: the row shape's maker (null: the document travels whole);
    // width: how many entries of `a` the document takes.
    // ro: what the called function was proved not to do (READ_ONLY_*);
    // same: the unchanged-document check it needs (null: no shape).
    let shape, del, table, nanos, logical, nk, f, width, ro, same;
    while (o < a.length) {
      // -2: the same header as the previous row.
      if (a[o] === -2) o += 1;
      else {
        shape = a[o] | 0;
        del = a[o + 1] === 1;
        table = topics[a[o + 2] | 0];
        const ti = (a[o + 3] | 0) * 2;
        nanos = times[ti];
        logical = times[ti + 1];
        nk = a[o + 4] | 0;
        f = shape >= 0 ? fns[shape] : null;
        width = shape >= 0 ? shapes[shape].length : 1;
        o += 5;
        ro = del ? roDeletes : roDispatch;
        same = f === null ? null : (ro & READ_ONLY_DOC) !== 0 ? unchanged : f.same;
        shared = null;
        if ((ro & READ_ONLY_META) !== 0) {
          if (nk < 0) shared = { schema: schema, table: table, nanos: nanos, logical: logical };
          else {
            sharedKey = new Array(nk);
            shared = { schema: schema, table: table, nanos: nanos, logical: logical, key: sharedKey };
          }
        }
      }
      let meta;
      if (shared !== null) {
        for (let j = 0; j < nk; j++) sharedKey[j] = a[o + j];
        if (nk > 0) o += nk;
        meta = shared;
      } else if (nk < 0) meta = { schema: schema, table: table, nanos: nanos, logical: logical };
      else {
        // Nearly every key has one column: a literal is cheaper than slice.
        const key = nk === 1 ? [a[o]] : a.slice(o, o + nk);
        meta = { schema: schema, table: table, nanos: nanos, logical: logical, key: key };
        o += nk;
      }
      const doc = f !== null ? f.make(a, o) : a[o];
      const v = del ? s.deletesTo(doc, meta) : s.dispatch(doc, meta);
      // Holding the previous row's result until this one exists keeps the
      // shapes of the script's own literals alive (see keepShapes).
      held = v;
      if (v === undefined || v === null) codes[nc++] = -1;
      else if (shape >= 0 && protoOf(v) === ObjectProto) {
        const ks = keysOf(v);
        const n = ks.length;
        const name = ks[0];
        let list, kept;
        if (n === 0) codes[nc++] = -1;
        else if (
          n === 1 &&
          isArray((list = v[name])) &&
          list.length === 1 &&
          list[0] === doc &&
          (kept = same === unchanged || same(doc, a, o))
        ) {
          if (name !== lastName) {
            lastT = tables.indexOf(name);
            if (lastT < 0) lastT = tables.push(name) - 1;
            lastName = name;
          }
          codes[nc++] = lastT;
        } else {
          codes[nc++] = -2 - results.length;
          results.push(encodeRouted(v, doc, same, a, o, kept));
        }
      } else {
        codes[nc++] = -2 - results.length;
        results.push(routable(shape >= 0 ? encodeRouted(v, doc, same, a, o) : v, key, positions === null ? offset + nc - 1 : positions[nc - 1]));
      }
      o += width;
    }
    return JSON.stringify([tables, codes, results]);
  }

  // rows: [[doc, meta], ...] for upserts, [[key, meta, true], ...] for deletes.
  function mapBatch(key, json) {
    const t = reg.tables[key];
    const rows = JSON.parse(json);
    const out = new Array(rows.length);
    for (let i = 0; i < rows.length; i++) {
      const r = rows[i];
      let v;
      if (r[2]) v = typeof t.deleteKey === "function" ? t.deleteKey(r[0], r[1]) : r[0];
      else v = typeof t.map === "function" ? t.map(r[0], r[1]) : r[0];
      out[i] = v === undefined ? null : v;
    }
    return JSON.stringify(out);
  }

  function mergeBatch(key, json) {
    const t = reg.tables[key];
    const fn = typeof t.merge === "function" ? t.merge : t.merge && t.merge.fallback;
    if (typeof fn !== "function") throw new Error("table " + key + " has no merge function");
    const ops = JSON.parse(json);
    const out = new Array(ops.length);
    for (let i = 0; i < ops.length; i++) {
      const v = fn(ops[i]);
      out[i] = v === undefined ? null : v;
    }
    return JSON.stringify(out);
  }

  function settle(f) {
    try {
      return Promise.resolve(f());
    } catch (e) {
      return Promise.reject(e);
    }
  }

  // The parts of a handed op that a script passing it on keeps, even when
  // it builds a new op around them (`{...op, data: {...op.data, x}}`).
  const OP_PARTS = ["data", "pk", "meta", "before"];
  // For the ops handed to apply (a copy: the script may reorder its array),
  // a function giving the index of the handed op that an op passed to
  // getTX().apply is, or whose data, key, meta or before it carries; -1 for
  // anything else. Each index is built only when first needed: most scripts
  // pass the ops themselves, and many never call getTX().apply.
  function origins(handed) {
    let byOp = null;
    let byPart = null;
    return function (op) {
      if (op === null || typeof op !== "object") return -1;
      if (byOp === null) {
        byOp = new Map();
        for (let h = 0; h < handed.length; h++) byOp.set(handed[h], h);
      }
      let i = byOp.get(op);
      if (i !== undefined) return i;
      if (byPart === null) {
        byPart = new Map();
        for (let h = 0; h < handed.length; h++) {
          for (const p of OP_PARTS) {
            const part = handed[h][p];
            if (part !== null && typeof part === "object") byPart.set(part, h);
          }
        }
      }
      for (let p = 0; i === undefined && p < OP_PARTS.length; p++) {
        const part = op[OP_PARTS[p]];
        if (part !== null && typeof part === "object") i = byPart.get(part);
      }
      return i === undefined ? -1 : i;
    };
  }

  function makeTx(columns, schema, table, originOf) {
    return Object.freeze({
      exec: (sql, ...args) =>
        settle(() => {
          native.tx("exec", String(sql), JSON.stringify(args));
        }),
      query: (sql, ...args) => settle(() => JSON.parse(native.tx("query", String(sql), JSON.stringify(args)))),
      // Sent as [from, ops]: from[i] is the index of the op handed to
      // apply that ops[i] is, or carries the data or key of (-1: none), so
      // that meridian puts back the exact numbers a double rounded.
      apply: (ops) =>
        settle(() => {
          const from = isArray(ops) ? ops.map(originOf) : [];
          native.tx("apply", "", JSON.stringify([from, ops]));
        }),
      columns: () => columns.map((c) => Object.assign({}, c)),
      schema: () => schema,
      table: () => table,
    });
  }

  function runApply(key, json, columnsJson, schema, table) {
    const t = reg.tables[key];
    const ops = JSON.parse(json);
    reg.tx = makeTx(JSON.parse(columnsJson), schema, table, origins(ops.slice()));
    return settle(() => t.apply(ops)).then(() => "null");
  }

  function endApply() {
    reg.tx = null;
  }

  Object.defineProperty(globalThis, "__meridian", {
    value: Object.freeze({ api, describe, dispatchBatch, mapBatch, mergeBatch, runApply, endApply }),
    enumerable: false,
  });
})(globalThis.__meridian_native);
delete globalThis.__meridian_native;
