#!/usr/bin/env node
// Runs one swarm on the orchestrator and prints its events, one JSON line each, as they arrive.
// Built from protos/ alone (no generated code): the .proto files are loaded at run time.
//
//   node run-swarm.mjs --target HOST:PORT --agents N "IDEA"
//
// A stream that breaks (UNAVAILABLE, or an end before the terminal event) is resumed with
// WatchSwarm(after_sequence = the last event printed), with backoff and jitter, for up to
// --resume-within seconds: each event is printed once, in order.
//
// A TLS orchestrator is reached with --tls-ca (and, for mTLS, --tls-cert and --tls-key); a token is
// sent with every call as `authorization: Bearer TOKEN` (--token, or better $SWARM_TOKEN, which `ps`
// does not show).
//
// Exit status: 0 when the last event is swarm_completed; 1 when it is swarm_failed or
// swarm_cancelled, or the call fails (the gRPC code and details go to stderr); 2 on bad usage;
// 130 after Ctrl-C.

import fs from "node:fs";
import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DEFAULT_PROTOS = path.resolve(HERE, "..", "..", "protos");
const USAGE = `usage: node run-swarm.mjs [--target HOST:PORT] [--agents N] [--model MODEL] [--detach]
                         [--request-id ID] [--resume-within SECONDS] [--protos DIR]
                         [--tls-ca PEM [--tls-cert PEM --tls-key PEM] [--tls-server-name NAME]]
                         [--token TOKEN] "IDEA"
  --target      orchestrator address (default: $SWARM_TARGET or localhost:50051)
  --agents      number of parallel worker agents (default: 3)
  --model       model override (default: the server's)
  --detach      the swarm keeps running if this client goes away
  --request-id  idempotency key
  --resume-within  how long to try to resume a broken stream; 0 = not at all
                (default: $SWARM_RESUME_WITHIN_S or 60)
  --protos      the protos/ directory (default: ${DEFAULT_PROTOS})
  --tls-ca      the CA the orchestrator's certificate is checked against; set = TLS
                (default: $SWARM_CLIENT_TLS_CA)
  --tls-cert, --tls-key  this client's certificate and key, for mTLS
                (default: $SWARM_CLIENT_TLS_CERT, $SWARM_CLIENT_TLS_KEY)
  --tls-server-name  the name on the orchestrator's certificate, when not the target's host
                (default: $SWARM_CLIENT_TLS_SERVER_NAME)
  --token       sent as authorization: Bearer TOKEN (default: $SWARM_TOKEN)`;

function usageError(message) {
  process.stderr.write(`run-swarm: ${message}\n${USAGE}\n`);
  process.exit(2);
}

let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      target: { type: "string", default: process.env.SWARM_TARGET || "localhost:50051" },
      agents: { type: "string", default: "3" },
      model: { type: "string", default: "" },
      detach: { type: "boolean", default: false },
      "request-id": { type: "string", default: "" },
      "resume-within": { type: "string", default: process.env.SWARM_RESUME_WITHIN_S || "60" },
      protos: { type: "string", default: DEFAULT_PROTOS },
      "tls-ca": { type: "string", default: process.env.SWARM_CLIENT_TLS_CA || "" },
      "tls-cert": { type: "string", default: process.env.SWARM_CLIENT_TLS_CERT || "" },
      "tls-key": { type: "string", default: process.env.SWARM_CLIENT_TLS_KEY || "" },
      "tls-server-name": { type: "string", default: process.env.SWARM_CLIENT_TLS_SERVER_NAME || "" },
      token: { type: "string", default: process.env.SWARM_TOKEN || "" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
} catch (error) {
  usageError(error.message);
}
const { values: opts, positionals } = parsed;
if (opts.help) {
  process.stdout.write(`${USAGE}\n`);
  process.exit(0);
}
if (positionals.length !== 1 || !positionals[0].trim()) usageError("exactly one IDEA is required");
if (!/^[1-9][0-9]*$/.test(opts.agents)) usageError(`--agents must be a positive integer, not ${opts.agents}`);
const resumeWithinS = Number(opts["resume-within"]);
if (!(resumeWithinS >= 0)) usageError(`--resume-within must be a number of seconds, not ${opts["resume-within"]}`);

// protos/ is the only import root; proto-loader brings the well-known types (Timestamp).
const definition = protoLoader.loadSync("swarm/v1/orchestrator.proto", {
  includeDirs: [opts.protos],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { OrchestratorService } = grpc.loadPackageDefinition(definition).swarm.v1;
function readPem(flag, file) {
  try {
    return fs.readFileSync(file);
  } catch (error) {
    usageError(`cannot read ${flag} ${file}: ${error.code ?? error.message}`);
  }
}

if (!opts["tls-ca"] && (opts["tls-cert"] || opts["tls-key"] || opts["tls-server-name"])) {
  usageError("--tls-cert, --tls-key and --tls-server-name need --tls-ca");
}
if (Boolean(opts["tls-cert"]) !== Boolean(opts["tls-key"])) usageError("--tls-cert and --tls-key go together");
const credentials = opts["tls-ca"]
  ? grpc.credentials.createSsl(
      readPem("--tls-ca", opts["tls-ca"]),
      opts["tls-key"] ? readPem("--tls-key", opts["tls-key"]) : null,
      opts["tls-cert"] ? readPem("--tls-cert", opts["tls-cert"]) : null,
    )
  : grpc.credentials.createInsecure();
// Sent with every call; never printed.
const metadata = new grpc.Metadata();
if (opts.token) metadata.set("authorization", `Bearer ${opts.token}`);
// grpc-js's own reconnection backoff grows to 120 s; kept to the resume schedule's 5 s, a restarted
// orchestrator is found again within seconds.
const client = new OrchestratorService(opts.target, credentials, {
  "grpc.initial_reconnect_backoff_ms": 250,
  "grpc.max_reconnect_backoff_ms": 5000,
  ...(opts["tls-server-name"] ? { "grpc.ssl_target_name_override": opts["tls-server-name"] } : {}),
});

const TERMINAL = new Set(["swarm_completed", "swarm_failed", "swarm_cancelled"]);
// Ideas and model output can hold anything. JSON.stringify escapes C0 controls (ESC included) but
// leaves DEL, C1 (an 8-bit CSI) and bidi overrides raw: those are escaped too (the same JSON value).
// Messages for stderr lose every control character.
const RAW_IN_JSON = /[\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g;
const CONTROLS = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g;
const jsonLine = (event) =>
  JSON.stringify(event).replace(RAW_IN_JSON, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
// What resuming needs: the swarm (named by its first event) and the last sequence printed.
let swarmId = "";
let lastSequence = 0;
let lastKind = "";
let current = null; // { stream, settled }: RunSwarm first, then a WatchSwarm after each break
let resumed = false;
let brokeAt = 0; // when the current break began (0: no break)
let attempts = 0;
let retryTimer = null;
let interrupted = false;

function finish(code, message) {
  if (message) process.stderr.write(`run-swarm: ${message.replace(CONTROLS, "")}\n`);
  process.exitCode = code;
  clearTimeout(retryTimer);
  client.close();
}

function finishWithOutcome() {
  finish(lastKind === "swarm_completed" ? 0 : 1);
}

// One call's stream, until the first of its "error" and "end" (grpc-js may emit both).
function follow(stream) {
  const call = { stream, settled: false };
  current = call;
  const settle = () => {
    const first = !call.settled;
    call.settled = true;
    return first;
  };
  stream.on("data", (response) => {
    const event = response.event ?? {};
    const sequence = Number(event.sequence);
    if (call.settled || sequence <= lastSequence) return; // already printed
    if (sequence > lastSequence + 1) {
      settle();
      stream.cancel();
      finish(1, `swarm ${swarmId}: events ${lastSequence + 1}..${sequence - 1} did not arrive`);
      return;
    }
    swarmId ||= event.swarm_id;
    lastSequence = sequence;
    lastKind = event.kind ?? "";
    brokeAt = 0; // progress: a later break gets the whole window
    attempts = 0;
    process.stdout.write(`${jsonLine(event)}\n`);
  });
  stream.on("error", (error) => {
    if (!settle()) return;
    if (interrupted) {
      if (!resumed) finish(130, "interrupted"); // RunSwarm cancelled: the swarm with it, unless detached
      return;
    }
    const details = error.details || error.message;
    if (TERMINAL.has(lastKind)) finishWithOutcome();
    else if (error.code === grpc.status.UNAVAILABLE && swarmId) resume(details);
    else finish(1, `${grpc.status[error.code] ?? String(error.code)}: ${details}`);
  });
  stream.on("end", () => {
    if (!settle() || interrupted) return;
    if (TERMINAL.has(lastKind)) finishWithOutcome();
    else if (swarmId) resume("the stream ended before the swarm did");
    else finish(1, "the stream ended before the swarm did");
  });
}

// Backoff with jitter: 0.1-0.2 s, doubling up to 5 s, until --resume-within has passed since the break.
function resume(cause) {
  const now = Date.now();
  brokeAt ||= now;
  const remainingMs = brokeAt + resumeWithinS * 1000 - now;
  if (remainingMs <= 0) {
    const how = resumeWithinS > 0 ? `could not be resumed within ${resumeWithinS}s` : "resuming is off";
    finish(
      1,
      `the stream of swarm ${swarmId} broke after sequence ${lastSequence} (${cause}) and ${how}: ` +
        `WatchSwarm it after sequence ${lastSequence}`,
    );
    return;
  }
  attempts += 1;
  resumed = true;
  const delayMs = Math.min(remainingMs, Math.min(5000, 200 * 2 ** (attempts - 1)) * (0.5 + Math.random() / 2));
  const line = `reconnecting… attempt ${attempts}, after sequence ${lastSequence}: ${cause}`;
  process.stderr.write(`run-swarm: ${line.replace(CONTROLS, "")}\n`);
  retryTimer = setTimeout(() => {
    follow(client.WatchSwarm({ swarm_id: swarmId, after_sequence: String(lastSequence) }, metadata));
  }, delayMs);
}

follow(
  client.RunSwarm(
    {
      idea: positionals[0],
      num_agents: Number(opts.agents),
      model: opts.model,
      detach: opts.detach,
      request_id: opts["request-id"],
    },
    metadata,
  ),
);

// Ctrl-C cancels the swarm unless --detach was given: by cancelling RunSwarm while that call is
// the stream; after a resume that call is gone, so by CancelSwarm.
process.on("SIGINT", () => {
  if (interrupted) return;
  interrupted = true;
  clearTimeout(retryTimer);
  if (!resumed) {
    current.stream.cancel(); // its "error" handler finishes
  } else if (!opts.detach && !TERMINAL.has(lastKind)) {
    const deadline = Date.now() + 10000;
    const request = { swarm_id: swarmId, reason: "the client cancelled RunSwarm" };
    client.CancelSwarm(request, metadata, { deadline }, (error) => {
      current.stream.cancel();
      finish(130, error ? `interrupted; the swarm was not cancelled: ${error.details || error.message}` : "interrupted");
    });
  } else {
    current.stream.cancel();
    finish(130, "interrupted");
  }
});
