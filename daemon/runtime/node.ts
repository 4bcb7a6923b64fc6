import { createServer } from "node:https";
import type { AddressInfo } from "node:net";
import { serve } from "@hono/node-server";
import type { Runtime, Server } from "./types.ts";

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
    });
  },
  onSignal(signal, handler) {
    process.on(signal, handler);
  },
};
