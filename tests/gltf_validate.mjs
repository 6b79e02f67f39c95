// Validate .glb files with the Khronos glTF validator; prints one JSON report per file (an array).
// Usage: node tests/gltf_validate.mjs FILE... (with gltf-validator installed, see scripts/test.sh)
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";

const require = createRequire(process.env.GLTF_VALIDATOR_DIR + "/");
const validator = require("gltf-validator");
const reports = [];
for (const path of process.argv.slice(2)) {
  const report = await validator.validateBytes(new Uint8Array(await readFile(path)), { maxIssues: 100 });
  reports.push({ path, errors: report.issues.numErrors, warnings: report.issues.numWarnings,
                 messages: report.issues.messages.map((m) => `${m.severity} ${m.code}: ${m.message}`) });
}
console.log(JSON.stringify(reports));
