// Shared by validate-crds.mjs and validate-dashboard.mjs: type-checks JSON
// objects as TypeScript object literals against published type definitions,
// where an unknown or misspelt field is an error (excess property check).
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

// String enums of the definitions accept their literal values, as JSON has them.
const LOOSE =
  "type Loose<T> = T extends string ? `${T}` : T extends number | boolean | null | undefined ? T" +
  " : T extends Array<infer U> ? Array<Loose<U>> : T extends object ? { [K in keyof T]: Loose<T[K]> } : T;";

/**
 * @param {string[]} imports  `import type ...` lines
 * @param {{label: string, type: string, value: unknown}[]} entries
 * @returns {string[]} one message per error, prefixed with the entry's label
 */
export function typecheck(imports, entries) {
  // Inside node_modules (ignored by git), so the packages resolve from there.
  const dir = mkdtempSync(join(here, "node_modules", ".typecheck-"));
  try {
    const body = entries
      .map((e, n) => `// ${e.label}\nexport const v${n}: Loose<${e.type}> = ${JSON.stringify(e.value, null, 2)};`)
      .join("\n\n");
    writeFileSync(join(dir, "objects.ts"), `${imports.join("\n")}\n${LOOSE}\n\n${body}\n`);
    writeFileSync(
      join(dir, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: {
          strict: true,
          noEmit: true,
          module: "nodenext",
          moduleResolution: "nodenext",
          target: "es2022",
          skipLibCheck: true,
          types: [],
        },
        files: ["objects.ts"],
      }),
    );
    const tsc = join(here, "node_modules", "typescript", "bin", "tsc");
    const run = spawnSync(process.execPath, [tsc, "-p", join(dir, "tsconfig.json")], { encoding: "utf8" });
    if (run.status === 0) return [];
    const source = readFileSync(join(dir, "objects.ts"), "utf8").split("\n");
    const errors = [];
    for (const line of (run.stdout + run.stderr).split("\n").filter(Boolean)) {
      const m = line.match(/objects\.ts\((\d+),\d+\)/);
      let owner = "typecheck";
      if (m) {
        for (let i = Number(m[1]) - 1; i >= 0; i--) {
          if (source[i].startsWith("// ")) {
            owner = source[i].slice(3);
            break;
          }
        }
      }
      errors.push(`${owner}: ${line.replace(/^.*objects\.ts\(\d+,\d+\): /, "")}`);
    }
    return errors;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
