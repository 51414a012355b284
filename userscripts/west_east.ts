// Runs in the meridian that receives west's changefeed and applies to EAST:
//   meridian start --userscript west_east.ts --targetConn postgresql://…east…
//
// Rows whose _source is 'east' were written in east and came back through
// west: drop them (that is what stops replication loops). Everything else is
// upserted with compare-and-set on (_timestamp, _source): the newer timestamp
// wins, and on an exact tie the larger _source wins ('west' > 'east'), so both
// sides pick the same winner. Losers go to the DLQ named after the table.
import * as api from "replicator@v1";
import { Document, Table } from "replicator@v1";

const LOCAL = "east";
const SOURCE = "kv.public";
const TABLES: Table[] = ["kv.public.kv"];

api.configureSource(SOURCE, {
    dispatch: (doc: Document, meta: Document): Record<Table, Document[]> | null => {
        if (doc._source === LOCAL) {
            return null;
        }
        return { [meta.table as string]: [doc] };
    },
    deletesTo: "",
});

for (const table of TABLES) {
    api.configureTable(table, {
        cas: ["_timestamp", "_source"],
        merge: api.standardMerge(() => ({ dlq: table })),
    });
}
