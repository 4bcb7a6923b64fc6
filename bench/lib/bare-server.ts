/**
 * The floor for bench/load.ts: a bare node:http server answering every request with the same
 * small JSON body. Writes `{"port": N}` once it listens, on 127.0.0.1 and a free port.
 */
import { createServer } from "node:http";

const body = JSON.stringify({ ok: true, node: "bare", version: "0.0.0" });
const server = createServer((_req, res) => {
  res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
});
server.keepAliveTimeout = 60_000;
server.listen(0, "127.0.0.1", () => {
  const address = server.address();
  process.stdout.write(`${JSON.stringify({ port: typeof address === "object" ? address?.port : 0 })}\n`);
});
process.on("SIGTERM", () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
});
