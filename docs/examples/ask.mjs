#!/usr/bin/env node
// A moe2 client in Node.js, written from docs/protocol.md alone: no Python, no moe2 code.
//
//   cd docs/examples && npm install
//   node ask.mjs nats://127.0.0.1:4222 "Why is the sky blue?" [--prefix moe2] [--max-tokens N]
//        [--temperature T] [--top-p P] [--seed S] [--stop STR]... [--experts K] [--timeout SECONDS]
//
// The answer streams to stdout as it arrives, then a newline. When the Final message arrives, one
// JSON line with its summary goes to stderr and the exit status is 0. On an Error message (or a
// local failure) stderr gets "error [<code>]: <message>" and the exit status is 1; bad usage is 2.

import { connect, createInbox, ErrorCode as NatsErrorCode } from "nats";
import { decode, encode } from "@msgpack/msgpack";

const PROTOCOL_VERSION = 1;
const TAG = /^moe2\.v(\d+)\.[a-z_]+$/;
const USAGE =
  'usage: node ask.mjs NATS_URL "prompt" [--prefix moe2] [--max-tokens N] [--temperature T] ' +
  "[--top-p P] [--seed S] [--stop STR]... [--experts K] [--timeout SECONDS]";

class Moe2Error extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function parseArgs(argv) {
  const positional = [];
  const opts = { prefix: "moe2", maxTokens: 128, temperature: 0, topP: 1, seed: null, stop: [],
    experts: null, timeout: 120 };
  const number = (name, value, integer) => {
    const n = Number(value);
    if (value === undefined || !Number.isFinite(n) || (integer && !Number.isInteger(n))) {
      throw new Moe2Error("usage", `${name} needs ${integer ? "an integer" : "a number"}`);
    }
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => argv[++i];
    switch (arg) {
      case "--prefix": opts.prefix = value(); break;
      case "--max-tokens": opts.maxTokens = number(arg, value(), true); break;
      case "--temperature": opts.temperature = number(arg, value(), false); break;
      case "--top-p": opts.topP = number(arg, value(), false); break;
      case "--seed": opts.seed = number(arg, value(), true); break;
      case "--stop": opts.stop.push(value() ?? ""); break;
      case "--experts": opts.experts = number(arg, value(), true); break;
      case "--timeout": opts.timeout = number(arg, value(), false); break;
      case "-h": case "--help": console.log(USAGE); process.exit(0); break;
      default:
        if (arg.startsWith("--")) throw new Moe2Error("usage", `unknown option ${arg}`);
        positional.push(arg);
    }
  }
  if (positional.length !== 2 || !opts.prefix) throw new Moe2Error("usage", "need NATS_URL and a prompt");
  return { url: positional[0], prompt: positional[1], ...opts };
}

// A Prompt (docs/protocol.md, "Prompt"). Integers must stay msgpack integers; a whole-number float
// such as temperature 0 or top_p 1 is also sent as an integer, which receivers accept for floats.
function promptMessage(args) {
  const prompt = {
    type: "moe2.v1.prompt",
    messages: [{ role: "user", content: args.prompt }],
    max_tokens: args.maxTokens,
    temperature: args.temperature,
    top_p: args.topP,
    stop: args.stop,
  };
  if (args.seed !== null) prompt.seed = args.seed;
  if (args.experts !== null) prompt.experts = args.experts;
  return prompt;
}

// One message from the reply inbox: the decoded map, or a Moe2Error for what the protocol says is
// an error (docs/protocol.md, "Versioning" and "Errors").
function readReply(msg) {
  if (msg.data.length === 0 && msg.headers && (msg.headers.code === 503 || msg.headers.status === "503")) {
    throw new Moe2Error("no_fusion_agent", "no fusion agent listens on the bus");
  }
  let item;
  try {
    item = decode(msg.data);
  } catch (err) {
    throw new Moe2Error("malformed", `not a msgpack message: ${err.message}`);
  }
  if (item === null || typeof item !== "object" || Array.isArray(item)) {
    throw new Moe2Error("malformed", "a message must be a map");
  }
  const tag = item.type;
  if (typeof tag !== "string") throw new Moe2Error("invalid_field", "missing string field 'type'");
  const m = TAG.exec(tag);
  if (m && Number(m[1]) !== PROTOCOL_VERSION) {
    throw new Moe2Error("unsupported_version", `${tag} is protocol v${m[1]}; this client speaks v1`);
  }
  if (tag === "moe2.v1.error") throw new Moe2Error(item.code, item.message);
  if (tag !== "moe2.v1.chunk" && tag !== "moe2.v1.final") {
    throw new Moe2Error("unknown_type", `unexpected ${tag} in an answer`);
  }
  return item;
}

function summary(final, chunks) {
  return JSON.stringify({
    session: final.session,
    finish_reason: final.finish_reason,
    text: final.text,
    chunks,
    usage: final.usage,
    timings: final.timings,
    experts: final.experts,
    weights: final.weights,
    late: final.late,
    dropped: final.dropped,
  });
}

// nats://user:password@host:port (or nats://token@host:port) carries credentials; pass them as
// options and connect to the URL without them.
function serverOptions(url) {
  let u;
  try {
    u = new URL(url);
  } catch {
    return { servers: url };
  }
  if (!u.username) return { servers: url };
  const user = decodeURIComponent(u.username);
  const pass = decodeURIComponent(u.password);
  u.username = "";
  u.password = "";
  return { servers: u.toString(), ...(pass ? { user, pass } : { token: user }) };
}

async function ask(args) {
  let nc;
  try {
    nc = await connect({ ...serverOptions(args.url), name: "moe2-js-client", timeout: 2000 });
  } catch (err) {
    const where = args.url.replace(/\/\/[^@/]*@/, "//");
    throw new Moe2Error("unreachable", `no NATS server reachable at ${where} (${err.code ?? err.message})`);
  }
  try {
    // Subscribe to the inbox first, then publish the prompt with reply = inbox.
    const inbox = createInbox();
    const sub = nc.subscribe(inbox);
    const data = encode(promptMessage(args));
    try {
      nc.publish(`${args.prefix}.v1.prompt`, data, { reply: inbox });
    } catch (err) {
      if (err.code === NatsErrorCode.MaxPayloadExceeded) {
        throw new Moe2Error("payload_too_large",
          `prompt of ${data.length} bytes is over the server's max_payload (${nc.info?.max_payload} bytes)`);
      }
      throw err;
    }
    const messages = sub[Symbol.asyncIterator]();
    let chunks = 0;
    for (;;) {
      let timer;
      const timeout = new Promise((_, reject) => {
        timer = setTimeout(
          () => reject(new Moe2Error("timeout", `no answer within ${args.timeout}s of the last message`)),
          args.timeout * 1000,
        );
      });
      const next = await Promise.race([messages.next(), timeout]).finally(() => clearTimeout(timer));
      if (next.done) throw new Moe2Error("internal", "the connection closed before the answer ended");
      const item = readReply(next.value);
      if (item.type === "moe2.v1.chunk") {
        chunks += 1;
        process.stdout.write(item.text);
      } else {
        process.stdout.write("\n");
        process.stderr.write(summary(item, chunks) + "\n");
        sub.unsubscribe();
        return;
      }
    }
  } finally {
    await nc.close();
  }
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${err.message}\n${USAGE}\n`);
    return 2;
  }
  try {
    await ask(args);
    return 0;
  } catch (err) {
    const code = err instanceof Moe2Error ? err.code : "internal";
    process.stderr.write(`error [${code}]: ${err.message}\n`);
    return 1;
  }
}

process.exitCode = await main();
