import type { Runtime, Server } from "./types.ts";

interface DenoServer {
  finished: Promise<void>;
  shutdown(): Promise<void>;
}
interface DenoApi {
  serve(
    options: { hostname: string; port: number; onListen(addr: { port: number }): void; signal?: AbortSignal },
    handler: (request: Request) => Response | Promise<Response>,
  ): DenoServer;
  addSignalListener(signal: string, handler: () => void): void;
}

const Deno = (globalThis as unknown as { Deno: DenoApi }).Deno;

export const denoRuntime: Runtime = {
  name: "deno",
  serve(fetch, hostname, port) {
    return new Promise<Server>((resolve, reject) => {
      try {
        const server = Deno.serve(
          { hostname, port, onListen: (addr) => resolve({ port: addr.port, close: () => server.shutdown() }) },
          fetch,
        );
      } catch (err) {
        reject(err);
      }
    });
  },
  onSignal(signal, handler) {
    Deno.addSignalListener(signal, handler);
  },
};
