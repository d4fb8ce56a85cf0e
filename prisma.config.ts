// Prisma 7's CLI configuration: Prisma 7 moved the datasource url here out of schema.prisma.
// Only `prisma validate` and `prisma generate` run in this repository (offline: see
// wedefi_pipelines_tests/node_app.py and README "Pointing WeDefiDaily at a database this
// project manages"); they need no database url. WeDefiDaily's own apps/api/prisma.config.ts
// adds `datasource: { url: env("DATABASE_URL") }` for its CLI, whose `db push` and `migrate`
// must never be pointed at a database this project manages.
import { defineConfig } from "prisma/config";

export default defineConfig({
  schema: "prisma/schema.prisma",
});
