// Builds the web todo app into one self-contained HTML file, app/todo.html (committed,
// so the server can embed it without Node). `--check` fails when the committed file
// differs from a fresh build.
import { build } from "esbuild";
import { readFileSync, writeFileSync } from "node:fs";

const result = await build({
  entryPoints: ["app/app.ts"],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2022",
  write: false,
  platform: "browser",
  legalComments: "none",
});
const js = result.outputFiles[0].text.replaceAll("</script", "<\\/script");
const html = readFileSync("app/index.html", "utf8").replace("/*APP*/", () => js.trim());
if (process.argv.includes("--check")) {
  const committed = readFileSync("app/todo.html", "utf8");
  if (committed !== html) {
    console.error("app/todo.html differs from a fresh build: run `npm run app` and commit it");
    process.exit(1);
  }
  console.log("app/todo.html is up to date");
} else {
  writeFileSync("app/todo.html", html);
  console.log(`app/todo.html: ${html.length} bytes`);
}
