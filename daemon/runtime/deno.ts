import type { Runtime, Server } from "./types.ts";

interface DenoServer {
  finished: Promise<void>;
  shutdown(): Promise<void>;
}
interface DenoApi {
  serve(
    options: { hostname: string; port: number; cert?: string; key?: string; onListen(addr: { port: number }): void },
    handler: (request: Request) => Response | Promise<Response>,
  ): DenoServer;
  addSignalListener(signal: string, handler: () => void): void;
}

const Deno = (globalThis as unknown as { Deno: DenoApi }).Deno;

export const denoRuntime: Runtime = {
  name: "deno",
  serve(fetch, { hostname, port, tls }) {
    return new Promise<Server>((resolve, reject) => {
      try {
        const onListen = (addr: { port: number }) => resolve({ port: addr.port, close: () => server.shutdown() });
        const server = Deno.serve({ hostname, port, ...tls, onListen }, fetch);
      } catch (err) {
        reject(err);
      }
    });
  },
  onSignal(signal, handler) {
    Deno.addSignalListener(signal, handler);
  },
};
