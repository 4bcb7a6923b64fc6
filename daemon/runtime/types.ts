/** What differs between Node and Deno, behind one interface the core receives. */
export interface Server {
  /** The port actually bound (useful with port 0). */
  port: number;
  /** Stops accepting connections and resolves once open ones are done. */
  close(): Promise<void>;
}

/** Where to listen, and the certificate and key (PEM) when the API is served over HTTPS. */
export interface Listen {
  hostname: string;
  port: number;
  tls?: { cert: string; key: string };
}

export interface Runtime {
  name: "node" | "deno";
  serve(fetch: (request: Request) => Response | Promise<Response>, listen: Listen): Promise<Server>;
  onSignal(signal: "SIGTERM" | "SIGINT" | "SIGHUP", handler: () => void): void;
}
