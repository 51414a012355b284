import * as api from "cdc-sink@v1";
import { Document, Table } from "cdc-sink@v1";

export function replicateTo(region: string, schema: string, tables: string[]) {
    console.log("configureSource " + schema)
    api.configureSource(schema, {
        dispatch: (doc: Document, meta: Document): Record<Table, Document[]> => {
            console.trace(JSON.stringify(doc), JSON.stringify(meta));
            let ret: Record<Table, Document[]> = {};
            if (doc._source !== region) {
                console.log("Processing " + doc.k + "(" + typeof doc.k + "):" + doc._source)
                ret[meta.table as string] = [doc];
            } else {
                console.log("Skipping " + doc.k + ":" + doc._source)
            }
            return ret
        },
        deletesTo: ""
    })

    for (let table of tables) {
        console.log("configureTable " + table)
        api.configureTable(table, {
            cas: ['_timestamp'],
            merge: api.standardMerge(() => ({ dlq: table }))
        })}
}

