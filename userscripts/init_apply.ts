import {replicateTo} from "repl_apply";
replicateTo('west','kv.public', ['kv.public.kv'])
