// A replicator-style variant of repl.ts that filters in the table's apply
// function instead of dispatch, then hands the survivors to meridian's
// standard apply (compare-and-set, merge, DLQ) through getTX().apply.
// Same signature as repl.ts's replicateTo: switch init.ts's import to use it.
import * as api from "replicator@v1";
import { ApplyOp, Document, Table } from "replicator@v1";

export function replicateTo(region: string, schema: string, tables: Table[]) {
    console.log("configureSource " + schema + " (filtering in apply)");
    for (const table of tables) {
        api.configureTable(table, {
            cas: ["_timestamp"],
            merge: api.standardMerge(() => ({ dlq: table })),
            apply: async (ops: ApplyOp[]) => {
                const keep = ops.filter((op: ApplyOp) => {
                    if (op.action === "delete") {
                        // Deletes are kept when the changefeed sent the old row.
                        return op.before !== undefined;
                    }
                    // Upserts written in the target region came back: drop them.
                    return (op.data as Document)._source !== region;
                });
                console.debug("apply " + table + ": " + keep.length + " of " + ops.length + " kept");
                if (keep.length > 0) {
                    await api.getTX().apply(keep);
                }
            },
        });
    }
}
