// Builds the console into dist/: index.html, app.js and app.css, nothing else. The output depends
// only on src/ and the pinned esbuild (no timestamps, no source maps, no absolute paths), so
// the committed dist/ can be checked against a fresh build:
//
//   node build.mjs            write dist/
//   node build.mjs --verify   build in memory and fail if dist/ differs (what CI runs)

import { build } from "esbuild";
import { mkdir, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const src = join(here, "src");
const dist = join(here, "dist");
const verify = process.argv.includes("--verify");

/** esbuild output for one entry point, as a string. */
async function bundle(entry, options) {
  const result = await build({
    entryPoints: [join(src, entry)],
    bundle: true,
    minify: true,
    write: false,
    sourcemap: false,
    legalComments: "none",
    charset: "ascii",
    logLevel: "warning",
    absWorkingDir: here,
    outdir: "out",
    ...options,
  });
  if (result.outputFiles.length !== 1) {
    throw new Error(`${entry}: expected one output file, esbuild wrote ${result.outputFiles.length}`);
  }
  return result.outputFiles[0].text;
}

/** index.html without comments and the whitespace between tags; it holds no <pre> or inline code. */
function minifyHtml(html) {
  if (/<(pre|textarea|script)[^>]*>[^<]/i.test(html) || /<style/i.test(html)) {
    throw new Error("src/index.html: inline scripts, styles and preformatted text are not allowed (CSP)");
  }
  return (
    html
      .replace(/<!--[\s\S]*?-->/g, "")
      .replace(/>\s+</g, "><")
      .replace(/\s{2,}/g, " ")
      .trim() + "\n"
  );
}

const files = {
  "app.js": await bundle("main.ts", { format: "esm", target: ["es2022", "chrome109", "firefox115", "safari16"] }),
  "app.css": await bundle("app.css", { loader: { ".css": "css" }, target: ["chrome109", "firefox115", "safari16"] }),
  "index.html": minifyHtml(await readFile(join(src, "index.html"), "utf8")),
};

if (verify) {
  const problems = [];
  const present = await readdir(dist).catch(() => []);
  for (const name of present) if (!(name in files)) problems.push(`dist/${name} is not a build output: remove it`);
  for (const [name, text] of Object.entries(files)) {
    const committed = await readFile(join(dist, name), "utf8").catch(() => null);
    if (committed === null) problems.push(`dist/${name} is missing`);
    else if (committed !== text) problems.push(`dist/${name} differs from a fresh build`);
  }
  if (problems.length) {
    console.error(`${problems.join("\n")}\nrun: npm ci --prefix ca/console && npm run --prefix ca/console build`);
    process.exit(1);
  }
  console.log("dist/ matches a fresh build");
} else {
  await rm(dist, { recursive: true, force: true });
  await mkdir(dist);
  for (const [name, text] of Object.entries(files)) {
    await writeFile(join(dist, name), text);
    console.log(`dist/${name}  ${Buffer.byteLength(text)} bytes`);
  }
}
