import { createServer } from "node:https";
import type { AddressInfo } from "node:net";
import { serve } from "@hono/node-server";
import type { Runtime, Server } from "./types.ts";

/** How long an idle kept-alive connection stays open. */
export const KEEP_ALIVE_MS = 65_000;

export const nodeRuntime: Runtime = {
  name: "node",
  serve(fetch, { hostname, port, tls }) {
    const https = tls ? { createServer, serverOptions: { cert: tls.cert, key: tls.key } } : {};
    return new Promise<Server>((resolve, reject) => {
      const server = serve({ fetch, hostname, port, ...https }, (info: AddressInfo) => {
        resolve({
          port: info.port,
          close: () =>
            new Promise<void>((done) => {
              server.close(() => done());
              if (!("closeIdleConnections" in server)) return;
              // A keep-alive connection goes idle once its answer is sent (a shutdown answers the
              // update in flight): close those too, instead of waiting for their timeout.
              server.closeIdleConnections();
              const idle = setInterval(() => server.closeIdleConnections(), 20);
              server.once("close", () => clearInterval(idle));
            }),
        });
      });
      server.once("error", reject);
      // Daemons keep connections to each other alive between heartbeats. A client reuses an idle
      // one only within the timeout the server announces (less a margin): with Node's default of
      // 5 s, a client whose event loop ran late could send on a connection the server was just
      // closing, and the request failed with "other side closed". A long timeout makes that rare.
      const http = server as unknown as { keepAliveTimeout: number; headersTimeout: number };
      http.keepAliveTimeout = KEEP_ALIVE_MS;
      http.headersTimeout = KEEP_ALIVE_MS + 1000; // must exceed keepAliveTimeout
    });
  },
  onSignal(signal, handler) {
    process.on(signal, handler);
  },
};
