// Builds, with esbuild:
// - the web console: console/ -> ../../rccs/console/ (console.js bundled with the client, @msgpack/msgpack and
//   qrcode-generator; index.html and console.css copied). Committed, and shipped in the Python wheel, so a
//   machine without Node can build the wheel.
// - the browser bundle of the client: dist/rccs-client.js (ESM).
// `node build.mjs --check` builds the console in memory and fails if rccs/console/ differs from it (the
// committed bundle must be what the sources make).
import { readFile, writeFile, mkdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const consoleOut = join(here, "../../rccs/console");
const check = process.argv.includes("--check");

const banner = `/* rccs console (built by clients/js/build.mjs from clients/js/console and clients/js/src; MIT).
 * Bundled: @msgpack/msgpack (ISC, the msgpack-javascript authors), qrcode-generator (MIT, Copyright (c) 2009
 * Kazuhiko Arase). */`;

async function consoleFiles() {
  const bundle = await esbuild.build({
    entryPoints: [join(here, "console/console.js")],
    bundle: true,
    format: "esm",
    target: "es2020",
    platform: "browser",
    minify: true,
    legalComments: "none",
    banner: { js: banner },
    write: false,
    logLevel: "error",
  });
  return {
    "console.js": bundle.outputFiles[0].contents,
    "index.html": await readFile(join(here, "console/index.html")),
    "console.css": await readFile(join(here, "console/console.css")),
  };
}

const files = await consoleFiles();
if (check) {
  const stale = [];
  for (const [name, contents] of Object.entries(files)) {
    const committed = await readFile(join(consoleOut, name)).catch(() => null);
    if (!committed || Buffer.compare(Buffer.from(committed), Buffer.from(contents)) !== 0) stale.push(name);
  }
  if (stale.length) {
    console.error(`rccs/console/ is not what clients/js builds (${stale.join(", ")}): run npm run build in clients/js`);
    process.exit(1);
  }
  console.log("rccs/console/ matches its sources");
} else {
  await mkdir(consoleOut, { recursive: true });
  for (const [name, contents] of Object.entries(files)) await writeFile(join(consoleOut, name), contents);
  await esbuild.build({
    entryPoints: [join(here, "src/index.js")],
    bundle: true,
    format: "esm",
    target: "es2020",
    platform: "browser",
    outfile: join(here, "dist/rccs-client.js"),
    logLevel: "error",
  });
  console.log("built rccs/console/ and dist/rccs-client.js");
}
