// The size gate: the client bundled and minified with esbuild, gzipped with node:zlib,
// must stay under 20 KB.
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const LIMIT = 20 * 1024;
const result = await build({
  entryPoints: ["dist/index.js"],
  bundle: true,
  minify: true,
  format: "esm",
  write: false,
  platform: "browser",
});
const code = result.outputFiles[0].contents;
const gz = gzipSync(code, { level: 9 }).length;
console.log(`bundle: ${code.length} bytes minified, ${gz} bytes gzipped (limit ${LIMIT})`);
if (gz > LIMIT) {
  console.error(`the client is over the size budget by ${gz - LIMIT} bytes`);
  process.exit(1);
}
