/** What differs between Node and Deno, behind one interface the core receives. */
export interface Server {
  /** The port actually bound (useful with port 0). */
  port: number;
  /** Stops accepting connections and resolves once open ones are done. */
  close(): Promise<void>;
}

export interface Runtime {
  name: "node" | "deno";
  serve(fetch: (request: Request) => Response | Promise<Response>, hostname: string, port: number): Promise<Server>;
  onSignal(signal: "SIGTERM" | "SIGINT" | "SIGHUP", handler: () => void): void;
}
