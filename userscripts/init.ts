import {replicateTo} from "repl";
replicateTo('west','kv.public', ['kv.public.kv'])
