import type { AddressInfo } from "node:net";
import { serve } from "@hono/node-server";
import type { Runtime, Server } from "./types.ts";

export const nodeRuntime: Runtime = {
  name: "node",
  serve(fetch, hostname, port) {
    return new Promise<Server>((resolve, reject) => {
      const server = serve({ fetch, hostname, port }, (info: AddressInfo) => {
        resolve({
          port: info.port,
          close: () =>
            new Promise<void>((done) => {
              server.close(() => done());
              if ("closeIdleConnections" in server) server.closeIdleConnections();
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
