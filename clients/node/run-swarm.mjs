#!/usr/bin/env node
// Runs one swarm on the orchestrator and prints its events, one JSON line each, as they arrive.
// Built from protos/ alone (no generated code): the .proto files are loaded at run time.
//
//   node run-swarm.mjs --target HOST:PORT --agents N "IDEA"
//
// Exit status: 0 when the last event is swarm_completed; 1 when it is swarm_failed or
// swarm_cancelled, or the call fails (the gRPC code and details go to stderr); 2 on bad usage.

import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DEFAULT_PROTOS = path.resolve(HERE, "..", "..", "protos");
const USAGE = `usage: node run-swarm.mjs [--target HOST:PORT] [--agents N] [--model MODEL] [--detach]
                         [--request-id ID] [--protos DIR] "IDEA"
  --target      orchestrator address (default: $SWARM_TARGET or localhost:50051)
  --agents      number of parallel worker agents (default: 3)
  --model       model override (default: the server's)
  --detach      the swarm keeps running if this client goes away
  --request-id  idempotency key
  --protos      the protos/ directory (default: ${DEFAULT_PROTOS})`;

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
      protos: { type: "string", default: DEFAULT_PROTOS },
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
const client = new OrchestratorService(opts.target, grpc.credentials.createInsecure());

const TERMINAL = new Set(["swarm_completed", "swarm_failed", "swarm_cancelled"]);
let lastKind = "";
let interrupted = false;
let failed = false;

const call = client.RunSwarm({
  idea: positionals[0],
  num_agents: Number(opts.agents),
  model: opts.model,
  detach: opts.detach,
  request_id: opts["request-id"],
});

call.on("data", (response) => {
  const event = response.event ?? {};
  lastKind = event.kind ?? "";
  process.stdout.write(`${JSON.stringify(event)}\n`);
});

// grpc-js emits "error" for a non-OK status and may still emit "end" after it.
call.on("error", (error) => {
  failed = true;
  const code = grpc.status[error.code] ?? String(error.code);
  if (interrupted) {
    process.stderr.write("run-swarm: interrupted\n");
    process.exitCode = 130;
  } else {
    process.stderr.write(`run-swarm: ${code}: ${error.details || error.message}\n`);
    process.exitCode = 1;
  }
  client.close();
});

call.on("end", () => {
  if (failed) return;
  if (lastKind === "swarm_completed") {
    process.exitCode = 0;
  } else {
    if (!TERMINAL.has(lastKind)) process.stderr.write("run-swarm: the stream ended before the swarm did\n");
    process.exitCode = 1;
  }
  client.close();
});

// Ctrl-C cancels the call, and with it the swarm unless --detach was given.
process.on("SIGINT", () => {
  interrupted = true;
  call.cancel();
});
