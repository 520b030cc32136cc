#!/usr/bin/env bash
# A third-party gRPC client (Node, @grpc/grpc-js) with a standard retryPolicy against a
# busy esmsearch-style server: does it back off by the server's grpc-retry-pushback-ms,
# stop at pushback -1 (a permanent limit), and back off on UNAVAILABLE?
#
# Usage: benchmarks/node_retry.sh   (needs node + npm, and the project's Python env active)
# npm installs @grpc/grpc-js and @grpc/proto-loader into a temporary directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

(cd "$tmp" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund @grpc/grpc-js @grpc/proto-loader >/dev/null)
echo "node $(node --version), @grpc/grpc-js $(node -p "require('$tmp/node_modules/@grpc/grpc-js/package.json').version")"

python "$repo/benchmarks/node_retry_server.py" >"$tmp/server.out" &
server_pid=$!
for _ in $(seq 100); do [[ -s "$tmp/server.out" ]] && break; sleep 0.1; done
port=$(head -n1 "$tmp/server.out")

cat >"$tmp/client.js" <<'JS'
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');
const [proto, includeDir, port] = process.argv.slice(2);
const def = loader.loadSync(proto, {includeDirs: [includeDir]});
const pkg = grpc.loadPackageDefinition(def);
// The same policy esmsearch's Python client puts in its service config (RetryPolicy()).
const serviceConfig = {
  methodConfig: [{
    name: [{service: 'esmsearch.v1.HomologSearch', method: 'GetIndexInfo'}],
    retryPolicy: {
      maxAttempts: 4, initialBackoff: '0.1s', maxBackoff: '5s', backoffMultiplier: 2,
      retryableStatusCodes: ['UNAVAILABLE', 'RESOURCE_EXHAUSTED'],
    },
  }],
};
const client = new pkg.esmsearch.v1.HomologSearch(`127.0.0.1:${port}`, grpc.credentials.createInsecure(),
  {'grpc.service_config': JSON.stringify(serviceConfig)});
function call(scenario) {
  return new Promise((resolve) => {
    const md = new grpc.Metadata();
    md.set('x-scenario', scenario);
    const t0 = process.hrtime.bigint();
    client.GetIndexInfo({}, md, {deadline: Date.now() + 10000}, (err, info) => {
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      const outcome = err ? grpc.status[err.code] : `OK (answered attempt ${info.count})`;
      console.log(`client ${scenario}: ${outcome} after ${ms.toFixed(0)} ms`);
      resolve();
    });
  });
}
(async () => {
  for (const s of ['busy', 'permanent', 'unavailable']) await call(s);
  client.close();
})();
JS
node "$tmp/client.js" "$repo/proto/esmsearch/v1/search.proto" "$repo/proto" "$port"
kill -TERM "$server_pid"
wait "$server_pid" || true
server_pid=""
echo "server-side attempts (ms since the scenario's first attempt):"
tail -n +2 "$tmp/server.out"
