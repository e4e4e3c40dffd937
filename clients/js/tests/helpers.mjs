// Shared helpers of the Node tests: the real `kalphite` binary as a server and a CLI,
// and waiting on conditions (bounded, never timed assertions about speed).
import { spawn, execFile } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const here = fileURLToPath(new URL(".", import.meta.url));
const root = resolve(here, "../../..");

/** The binary: KALPHITE_BIN, else the release build, else the debug build. */
export function kalphiteBin() {
  if (process.env.KALPHITE_BIN) return process.env.KALPHITE_BIN;
  const release = join(root, "target/release/kalphite");
  if (existsSync(release)) return release;
  return join(root, "target/debug/kalphite");
}

/** A fresh temporary directory, removed by the returned function. */
export function tempDir() {
  const dir = mkdtempSync(join(tmpdir(), "kalphite-js-"));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Starts `kalphite serve` on loopback; resolves with its URL once it listens. */
export async function startServer({ dir, port = 0, args = [] }) {
  const bin = kalphiteBin();
  if (!existsSync(bin)) throw new Error(`no kalphite binary at ${bin}: build it (cargo build -p kalphite-cli) or set KALPHITE_BIN`);
  const child = spawn(bin, ["serve", "--listen", `127.0.0.1:${port}`, "--db", `sqlite:${join(dir, "server.db")}`, "-q", ...args], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let err = "";
  child.stderr.on("data", (d) => (err += d));
  const url = await new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error(`the server did not start in 30 s: ${err}`)), 30_000);
    child.stdout.on("data", (d) => {
      out += d;
      const m = /listening on (ws:\/\/[0-9.:]+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolvePromise(m[1]);
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`the server exited (${code}): ${err}`));
    });
  });
  const p = Number(new URL(url).port);
  // A child killed by a signal keeps exitCode null (its signalCode is set): waiting for
  // an "exit" that already came would leave the test pending with nothing to wake it.
  const gone = () => child.exitCode !== null || child.signalCode !== null;
  return {
    url,
    port: p,
    stop: () =>
      new Promise((res) => {
        if (gone()) return res();
        child.once("exit", () => res());
        child.kill("SIGTERM");
      }),
    kill: () =>
      new Promise((res) => {
        if (gone()) return res();
        child.once("exit", () => res());
        child.kill("SIGKILL");
      }),
  };
}

const run = promisify(execFile);

/** Runs the binary with `args`; resolves with stdout. */
export async function cli(args, env = {}) {
  const { stdout } = await run(kalphiteBin(), args, { env: { ...process.env, ...env, NO_COLOR: "1" }, timeout: 60_000 });
  return stdout;
}

/** Waits until `check()` is truthy (polling), or fails after `ms` saying `what`. */
export async function until(check, what, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
