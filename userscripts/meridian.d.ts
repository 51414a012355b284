/**
 * The userscript API of meridian, compatible with cdc-sink / replicator
 * userscripts. Print it with `meridian userscript --api`.
 *
 * Scripts are TypeScript or JavaScript ES modules. Types are stripped, not
 * checked, when meridian loads a script; point an editor (or `tsc --noEmit`)
 * at this file to check them. Imports may name `replicator@v1`, `cdc-sink@v1`
 * (the same module) or `.ts`/`.js` files in the script's folder
 * (`import {replicateTo} from "repl"` loads `repl.ts`). Nothing else is
 * reachable: no file system, no network.
 *
 * Every call into the script runs under a time limit (--userscriptTimeout)
 * and a heap limit (--userscriptMemoryMiB). A call that throws, rejects,
 * runs too long or runs out of memory fails only the request at hand.
 */

declare module "replicator@v1" {
    /** The name of a SQL column. */
    type Column = string;

    /** A row or document: a loosely-typed bag of JSON values. */
    type Document = {
        [x: string]: DocumentValue;
    };

    /** Any JSON-ish value found in a Document. */
    type DocumentValue =
        | null
        | boolean
        | number
        | string
        | Document
        | Array<DocumentValue>;

    /** A duration such as "1h", "30m", "1h30m", "500ms" (Go syntax). */
    type Duration = string;

    /**
     * A table name: `table`, `schema.table` or `database.schema.table`.
     * Parts may be double-quoted: `db.public."table.with.dots"`.
     */
    type Table = string;

    /**
     * Declares how rows arriving for a source are routed. `sourceName` is the
     * webhook URL's `database.schema`, e.g. `kv.public` for
     * `POST /kv/public`.
     */
    function configureSource(
        sourceName: string,
        props: ConfigureSourceDestination & Partial<ConfigureSourceOptions>,
    ): void;

    type ConfigureSourceDestination =
        | {
              /**
               * Routes one row: returns a map of target table to documents
               * to upsert there, or null / {} to drop the row. `doc` is the
               * new row; `meta` carries at least `schema`, `table` (the
               * changefeed topic, or the URL's table), `nanos`, `logical`
               * and `key` (the primary key values).
               */
              dispatch: (doc: Document, meta: Document) => Record<Table, Document[]> | null;
              /**
               * Where deletes go: a table name, "" for the table the topic
               * names, or a function that routes a delete like dispatch
               * (its `doc` is the row before the delete, when known).
               */
              deletesTo?: Table | ((doc: Document, meta: Document) => Record<Table, Document[]> | null);
          }
        | {
              /** Every row of the source goes to this table. */
              target: Table;
          };

    type ConfigureSourceOptions = {
        /** Accepted for compatibility; has no effect. */
        recurse: boolean;
    };

    /** Configures how rows are applied to one target table. */
    function configureTable(tableName: Table, props: Partial<ConfigureTableOptions>): void;

    /** One operation handed to a table's apply function. */
    type ApplyOp = (
        | {
              action: "delete";
          }
        | {
              action: "upsert";
              data: Document;
          }
    ) & {
        /** The row before the change, when the changefeed sent it. */
        before?: Document;
        /**
         * `schema`, `table`, and the change's time: `updated` exactly (the
         * changefeed's "nanos.logical" text) and `nanos`, `logical` as
         * numbers. Pass the op (or its `meta`) on to `getTX().apply` and a
         * row that loses reaches the DLQ with its own time.
         */
        meta: Document;
        /** Primary key values, in key order. */
        pk: DocumentValue[];
    };

    /** An operation for `getTX().apply`: `pk` is needed for deletes only. */
    type TxApplyOp =
        | { action: "upsert"; data: Document; before?: Document; pk?: DocumentValue[]; meta?: Document }
        | { action: "delete"; pk: DocumentValue[]; before?: Document; meta?: Document };

    type ConfigureTableOptions = {
        /**
         * Writes the rows yourself, through getTX(), inside the request's
         * transaction. Throwing or rejecting rolls the request back.
         */
        apply(ops: ApplyOp[]): Promise<any>;
        /** Compare-and-set columns: a row is written only if these are newer. */
        cas: Column[];
        /** Drop rows whose column is older than now minus the duration. */
        deadlines: { [k: Column]: Duration };
        /**
         * Columns that identify a row for deletes: a delete's key (or, when
         * its length differs, its `before` row's values of these columns)
         * finds the rows with those values, instead of the primary key. Or a
         * function that maps a delete's key (return null to skip the delete).
         */
        deleteKey: Column[] | ((key: DocumentValue[], meta: Document) => DocumentValue[] | null);
        /** SQL expressions for columns; `$0` is the incoming value. */
        exprs: { [k: Column]: string };
        /** A JSONB column collecting properties with no matching column. */
        extras: Column;
        /** Columns never written. */
        ignore: { [k: Column]: boolean };
        /** Rewrites (or, returning null, drops) each upsert. */
        map: (d: Document, meta: Document) => Document | null;
        /** Resolves rows that lose compare-and-set. */
        merge: MergeFunction | StandardMerge;
        /** Most rows per statement. */
        rowLimit: number;
    };

    /** Called for a row that lost compare-and-set. */
    type MergeFunction = (op: MergeOperation) => MergeResult;

    type MergeOperation = {
        /** The row before the change, in a three-way merge. */
        before?: Document;
        /** `nanos`, `logical`, `schema`, `table` of the proposed change. */
        meta: Document;
        /** The incoming row. */
        proposed: Document;
        /** The row in the target now. */
        target: Document;
        /** With standardMerge: the columns it could not merge. */
        unmerged?: Column[];
    };

    type MergeResult =
        | {
              /** Write this row unconditionally. */
              apply: Document;
          }
        | {
              /** Record the change in the dead-letter queue under this name. */
              dlq: string;
          }
        | {
              /** Forget the change. */
              drop: true;
          };

    /** Opaque result of standardMerge(). */
    type StandardMerge = {};

    /**
     * A three-way merge: columns changed at the source are applied when the
     * target still holds their `before` value; otherwise `fallback` decides.
     */
    function standardMerge(fallback?: MergeFunction): StandardMerge;

    /** A target column as introspected by meridian. */
    type TargetColumn = {
        defaultExpr?: string;
        ignored: boolean;
        name: string;
        primary: boolean;
        type: string;
    };

    /** The request's database transaction, inside a table's apply function. */
    type TargetTX = {
        /** Applies operations the standard way (CAS, merge, DLQ). */
        apply(ops: TxApplyOp[]): Promise<void>;
        /** The table's columns, primary key first. */
        columns(): TargetColumn[];
        /** Runs a statement ($1, $2, ... placeholders). */
        exec(query: string, ...params: any): Promise<void>;
        /** Runs a query; resolves to rows of column values. */
        query(query: string, ...params: any): Promise<Iterable<any[]>>;
        /** The quoted target schema. */
        schema(): string;
        /** The quoted, qualified target table. */
        table(): string;
    };

    /** The current transaction; only while a table's apply function runs. */
    function getTX(): TargetTX;

    /** A random (v4) UUID. */
    function randomUUID(): string;

    /** Sets command-line options (by flag name) from the script. */
    function setOptions(opts: { [k: string]: string }): void;

    /** The `meta` property that holds a row's primary key values: `meta[replicationKey]`. */
    const replicationKey: "key";
}

declare module "cdc-sink@v1" {
    export * from "replicator@v1";
}

/** console.* write to meridian's log (target meridian::userscript) with the script's name. */
declare var console: {
    log(...args: any[]): void;
    info(...args: any[]): void;
    debug(...args: any[]): void;
    trace(...args: any[]): void;
    warn(...args: any[]): void;
    error(...args: any[]): void;
};
