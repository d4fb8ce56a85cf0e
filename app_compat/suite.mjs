// WeDefiDaily's own client against a database and a cache this project manages.
//
//   node app_compat/suite.mjs prisma   the app's Prisma calls (issue 12's Works and Breaks
//                                      lists), each checked against SQL on the primary
//   node app_compat/suite.mjs cache    the seed's CacheManager reading keys the pipeline
//                                      refreshed, each compared with what Prisma returns
//
// Environment: DATABASE_URL_PRIMARY, DATABASE_URL_READ, DATABASE_URL_ANALYTICS, REDIS_URL
// (the configuration contract), and TZ set to a zone that is not UTC, so a timestamp read
// or written in local time shows. wedefi_pipelines_tests/test_app_compat.py runs it
// (after provisioning the months around today, and between the two phases the
// pipeline's cache refresh). Prints one JSON report on stdout; exits 1 naming every
// failed call.
import pg from "pg";
import Redis from "ioredis";
import { Prisma } from "@prisma/client";
import { CacheManager, DatabaseManager } from "./seed.mjs";

const env = process.env;
for (const name of ["DATABASE_URL_PRIMARY", "DATABASE_URL_READ", "DATABASE_URL_ANALYTICS", "REDIS_URL"]) {
  if (!env[name]) fail(`${name} is not set`);
}
if (new Date("2025-01-31T12:00:00Z").getTimezoneOffset() === 0) {
  fail(`TZ=${env.TZ ?? "(unset)"} is UTC here: run the suite in another time zone so a timestamp mistake shows`);
}

const phase = process.argv[2];
const results = [];
const failures = [];
const report = { phase, node: process.version, prisma: Prisma.prismaVersion.client, tz: env.TZ, results };
const sqlPool = new pg.Pool({ connectionString: env.DATABASE_URL_PRIMARY, max: 2 });
const db = new DatabaseManager(env);
const app = db.primaryClient; // the app's own jobs use one client on DATABASE_URL
const HOUR = 3600_000;
const now = new Date();

function fail(message) {
  console.error(`app-compat: ${message}`);
  process.exit(1);
}

async function call(name, fn) {
  try {
    const outcome = (await fn()) ?? {};
    results.push({ call: name, result: outcome.result ?? "works", note: outcome.note ?? "" });
  } catch (error) {
    const message = String(error?.message ?? error).trim().replace(/\n{2,}/g, "\n");
    results.push({ call: name, result: "FAILED", note: message });
    // Prisma's errors say what failed in their message (code, constraint, column); others need their stack
    failures.push(`${name}: ${error?.code ? `${error.code} ${message}` : error?.stack ?? message}`);
  }
}

function expect(condition, message) {
  if (!condition) throw new Error(message);
}

// Deep equality after JSON: arrays as multisets (Prisma's findMany has no order), object
// members in any order, strings (decimals included) exactly.
function canonical(value) {
  if (Array.isArray(value)) return `[${value.map(canonical).sort().join(",")}]`;
  if (value !== null && typeof value === "object") {
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

function expectSame(actual, expected, what) {
  const a = canonical(JSON.parse(JSON.stringify(actual)));
  const e = canonical(JSON.parse(JSON.stringify(expected)));
  if (a !== e) throw new Error(`${what} differs:\n  got      ${a.slice(0, 1500)}\n  expected ${e.slice(0, 1500)}`);
}

async function sql(text, params = []) {
  return (await sqlPool.query(text, params)).rows;
}

const iso = (column) => `to_char(${column}, 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')`;
const dec = (text) => (text === null ? null : new Prisma.Decimal(text).toJSON());

// What `JSON.stringify` makes of a Prisma row, rebuilt from SQL text (decimals via
// decimal.js, times as UTC ISO, BigInt by the app's toJSON rule).
const WALLET_COLS = `w.id, w.address, w."chainId", w.label, w.metadata, ${iso('w."createdAt"')} AS "createdAt", ${iso('w."updatedAt"')} AS "updatedAt"`;
const TOKEN_COLS = `t.id, t."chainId", t.address, t.symbol, t.name, t.decimals, t."isNative", t.metadata, ${iso('t."createdAt"')} AS "createdAt", ${iso('t."updatedAt"')} AS "updatedAt"`;
const BALANCE_COLS = `b.id, b."walletId", b."tokenId", b."rawBalance", b.quantity::text AS quantity, b."usdValue"::text AS "usdValue", b."blockNumber"::text AS "blockNumber", ${iso('b."fetchedAt"')} AS "fetchedAt", ${iso('b."createdAt"')} AS "createdAt", ${iso('b."updatedAt"')} AS "updatedAt"`;

async function expectedPortfolio(walletId) {
  const wallets = await sql(`SELECT ${WALLET_COLS} FROM "Wallet" w WHERE w.id = $1`, [walletId]);
  const out = [];
  for (const wallet of wallets) {
    const balances = await sql(`SELECT ${BALANCE_COLS} FROM "TokenBalance" b WHERE b."walletId" = $1 AND b."usdValue" > 0`, [wallet.id]);
    for (const b of balances) {
      b.quantity = dec(b.quantity);
      b.usdValue = dec(b.usdValue);
      [b.token] = await sql(`SELECT ${TOKEN_COLS} FROM "Token" t WHERE t.id = $1`, [b.tokenId]);
    }
    out.push({ ...wallet, balances });
  }
  return out;
}

async function expectedLocks(walletId) {
  const rows = await sql(
    `SELECT id, "protocolId", "walletId", "lockAmount"::text AS "lockAmount", "votingPower"::text AS "votingPower",
            "boostMultiplier"::text AS "boostMultiplier", ${iso('"lockEndsAt"')} AS "lockEndsAt",
            ${iso('"lastRefreshedAt"')} AS "lastRefreshedAt", metadata, ${iso('"createdAt"')} AS "createdAt",
            ${iso('"updatedAt"')} AS "updatedAt"
       FROM "GovernanceLock" WHERE "walletId" = $1`, [walletId]);
  return rows.map((r) => ({ ...r, lockAmount: dec(r.lockAmount), votingPower: dec(r.votingPower), boostMultiplier: dec(r.boostMultiplier) }));
}

async function placed(table, id) {
  const rows = await sql(`SELECT tableoid::regclass::text AS part, * FROM "${table}" WHERE id = $1`, [id]);
  expect(rows.length === 1, `${table} ${id}: ${rows.length} rows in the database, expected 1`);
  return rows[0];
}

async function waitForReplay(url, what) {
  const [{ lsn }] = await sql("SELECT pg_current_wal_lsn()::text AS lsn");
  const replica = new pg.Client({ connectionString: url });
  await replica.connect();
  try {
    const deadline = Date.now() + 15_000;
    for (;;) {
      const { rows } = await replica.query("SELECT pg_is_in_recovery() AS standby, pg_last_wal_replay_lsn() >= $1::pg_lsn AS done", [lsn]);
      expect(rows[0].standby, `${what} is not a standby (pg_is_in_recovery() is false)`);
      if (rows[0].done) return;
      expect(Date.now() < deadline, `${what} did not replay ${lsn} within 15 s`);
      await new Promise((r) => setTimeout(r, 20));
    }
  } finally {
    await replica.end();
  }
}

async function expectPrismaError(promise, code) {
  try {
    await promise;
  } catch (error) {
    expect(error?.code === code, `expected ${code}, got ${error?.code}: ${error?.message}`);
    return error;
  }
  throw new Error(`expected ${code}, the call succeeded`);
}

const month = (d) => `${d.getUTCFullYear()}_${String(d.getUTCMonth() + 1).padStart(2, "0")}`;

// -- phase 1: the app's Prisma calls -----------------------------------------------------------

async function prismaPhase() {
  const ids = {};
  await call("chain.upsert / wallet.create / token.upsert (chainId_address) / protocol.create", async () => {
    await app.chain.upsert({ where: { id: 8453 }, update: {}, create: { id: 8453, name: "Base", shortName: "base", nativeCurrencySymbol: "ETH" } });
    for (const [key, address, label] of [["alice", "0x00000000000000000000000000000000000000a1", "Alice"],
      ["bob", "0x00000000000000000000000000000000000000b2", null], ["carol", "0x00000000000000000000000000000000000000c3", "Carol"],
      ["dave", "0x00000000000000000000000000000000000000d4", "to be deleted"]]) {
      const wallet = await app.wallet.create({ data: { address, chainId: 8453, label, metadata: key === "alice" ? { tags: ["main"], risk: 0.25, big: 12345678901234567890 } : undefined } });
      ids[key] = wallet.id;
      const row = await placed("Wallet", wallet.id);
      expect(row.address === address && row.label === label, `Wallet ${key}: ${JSON.stringify(row)}`);
    }
    for (const [key, address, symbol, decimals] of [["eth", "0x0000000000000000000000000000000000000000", "ETH", 18],
      ["usdc", "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913", "USDC", 6], ["aero", "0x940181a94a35a4569e4529a3cdfb74e38fd98631", "AERO", 18],
      ["dust", "0x00000000000000000000000000000000000000f5", "DUST", 18]]) {
      const token = await app.token.upsert({
        where: { chainId_address: { chainId: 8453, address } },
        update: { symbol }, create: { chainId: 8453, address, symbol, name: `${symbol} token`, decimals, isNative: key === "eth" },
      });
      ids[key] = token.id;
      const again = await app.token.upsert({ where: { chainId_address: { chainId: 8453, address } }, update: { decimals }, create: { chainId: 8453, address, symbol, name: "x", decimals } });
      expect(again.id === token.id, `token.upsert ${key} created a second row`);
    }
    const velo = await app.protocol.create({ data: { slug: "velodrome", name: "Velodrome", chainId: 8453 } });
    const aerodrome = await app.protocol.create({ data: { slug: "aerodrome", name: "Aerodrome", chainId: 8453 } });
    ids.velo = velo.id;
    ids.aerodrome = aerodrome.id;
    const [{ n }] = await sql('SELECT count(*)::int AS n FROM "Token"');
    expect(n === 4, `${n} tokens in the database, expected 4`);
  });

  const balances = [
    // wallet, token, quantity, usdValue, blockNumber
    ["alice", "eth", "1.5", "4500.123456789012345678", 19000000n],
    ["alice", "usdc", "1500000000000000000000.000000000000000000000000000001", "123456789012345678.123456789012345678", 9007199254740993n],
    ["alice", "dust", "0.00000001", "0.000000000000000001", null],
    ["alice", "aero", "10", null, null],
    ["bob", "usdc", "10", "10", 19000001n],
    ["bob", "eth", "0.0033", "0", null],
    ["carol", "aero", "4", "5.5", 19000002n],
    ["dave", "eth", "1", "3000", null],
  ];
  await call("tokenBalance.upsert on walletId_tokenId (create path), as sync-balances.ts", async () => {
    for (const [w, t, quantity, usdValue, blockNumber] of balances) {
      await app.tokenBalance.upsert({
        where: { walletId_tokenId: { walletId: ids[w], tokenId: ids[t] } },
        update: { rawBalance: "0", quantity: "0", fetchedAt: new Date() },
        create: { walletId: ids[w], tokenId: ids[t], rawBalance: quantity.replace(".", "").replace(/^0+(?=\d)/, ""), quantity, usdValue: usdValue ?? undefined, blockNumber: blockNumber ?? undefined },
      });
      const [row] = await sql('SELECT quantity::text AS q, "usdValue"::text AS u, "blockNumber"::text AS b, tableoid::regclass::text AS part FROM "TokenBalance" WHERE "walletId" = $1 AND "tokenId" = $2', [ids[w], ids[t]]);
      expect(new Prisma.Decimal(row.q).eq(quantity) && (usdValue === null ? row.u === null : new Prisma.Decimal(row.u).eq(usdValue)),
        `${w}/${t}: the database holds ${row.q}, ${row.u}; written ${quantity}, ${usdValue}`);
      expect(row.b === (blockNumber === null ? null : String(blockNumber)), `${w}/${t} blockNumber ${row.b}`);
      expect(/^"TokenBalance_part_\d"$/.test(row.part), `${w}/${t} landed in ${row.part}`);
    }
  });
  await call("tokenBalance.upsert on walletId_tokenId (update path)", async () => {
    const before = await app.tokenBalance.findUnique({ where: { walletId_tokenId: { walletId: ids.bob, tokenId: ids.usdc } } });
    const fetchedAt = new Date(now.getTime() - 90_000);
    const after = await app.tokenBalance.upsert({
      where: { walletId_tokenId: { walletId: ids.bob, tokenId: ids.usdc } },
      update: { rawBalance: "12500000", quantity: "12.5", usdValue: "12.5", fetchedAt },
      create: { walletId: ids.bob, tokenId: ids.usdc, rawBalance: "0", quantity: "0" },
    });
    expect(after.id === before.id, "the update path created a new row");
    const rows = await sql(`SELECT quantity::text AS q, ${iso('"fetchedAt"')} AS f FROM "TokenBalance" WHERE "walletId" = $1 AND "tokenId" = $2`, [ids.bob, ids.usdc]);
    expect(rows.length === 1 && new Prisma.Decimal(rows[0].q).eq("12.5"), `rows ${JSON.stringify(rows)}`);
    expect(rows[0].f === fetchedAt.toISOString(), `fetchedAt stored as ${rows[0].f}, written ${fetchedAt.toISOString()} (TZ=${env.TZ})`);
  });
  await call("DatabaseManager.updateTokenBalance (primary; both upsert paths)", async () => {
    const data = { walletId: ids.carol, tokenId: ids.usdc, rawBalance: "0", quantity: "0", usdValue: "0" };
    await db.updateTokenBalance(data);
    await db.updateTokenBalance({ ...data, rawBalance: "1000000", quantity: "1" });
    const rows = await sql('SELECT "rawBalance" AS r FROM "TokenBalance" WHERE "walletId" = $1 AND "tokenId" = $2', [ids.carol, ids.usdc]);
    expect(rows.length === 1 && rows[0].r === "1000000", `rows ${JSON.stringify(rows)}`);
  });

  const priceAt = new Date(Math.floor((now.getTime() - 2 * 60_000) / 1000) * 1000 + 123);
  let priceId;
  await call("priceSnapshot.create, as sync-balances.ts records a price", async () => {
    for (const [t, price] of [["eth", "3001.25"], ["usdc", "0.999912345678901234"], ["aero", "1.234567890123456789"], ["dust", "0.000000000000000001"]]) {
      const created = await app.priceSnapshot.create({ data: { tokenId: ids[t], priceUsd: new Prisma.Decimal(price), source: "coingecko", recordedAt: priceAt } });
      if (t === "eth") priceId = created.id;
      const row = await sql(`SELECT tableoid::regclass::text AS part, "priceUsd"::text AS p, ${iso('"recordedAt"')} AS at FROM "PriceSnapshot" WHERE id = $1`, [created.id]);
      expect(row[0].part === `"PriceSnapshot_${month(priceAt)}"`, `landed in ${row[0].part}`);
      expect(new Prisma.Decimal(row[0].p).eq(price) && row[0].at === priceAt.toISOString(), `stored ${JSON.stringify(row[0])}`);
    }
    const old = await app.priceSnapshot.create({ data: { tokenId: ids.eth, priceUsd: "1200", source: "coingecko", recordedAt: new Date("2023-01-15T00:00:00Z") } });
    const row = await placed("PriceSnapshot", old.id);
    expect(row.part === '"PriceSnapshot_default"', `a month without a child: landed in ${row.part}`);
    return { note: "a month without its child (here 2023-01) lands in the default partition; provisioning moves it" };
  });
  await call("priceSnapshot.createMany (and skipDuplicates)", async () => {
    const data = Array.from({ length: 12 }, (_, i) => ({ tokenId: ids.eth, priceUsd: String(3000 + i / 4), source: "synthetic", recordedAt: new Date(now.getTime() - (i + 3) * 5 * 60_000) }));
    const created = await app.priceSnapshot.createMany({ data });
    const again = await app.priceSnapshot.createMany({ data, skipDuplicates: true });
    expect(created.count === 12 && again.count === 0, `createMany counts ${created.count}, ${again.count}`);
    const [{ n }] = await sql(`SELECT count(*)::int AS n FROM "PriceSnapshot" WHERE "tokenId" = $1 AND source = 'synthetic'`, [ids.eth]);
    expect(n === 12, `${n} rows in the database`);
  });
  await call("priceSnapshot duplicate (tokenId, recordedAt, source) in a provisioned month", async () => {
    const error = await expectPrismaError(app.priceSnapshot.create({ data: { tokenId: ids.eth, priceUsd: "1", source: "coingecko", recordedAt: priceAt } }), "P2002");
    return { result: "documented difference", note: `refused with P2002 (${JSON.stringify(error.meta?.target ?? error.meta?.driverAdapterError?.cause?.constraint ?? "")}): each monthly child has UNIQUE ("tokenId","recordedAt","source"); the app's schema allows the duplicate` };
  });
  await call("latest price: priceSnapshot.findFirst orderBy recordedAt desc, as sync-performance.ts", async () => {
    const latest = await app.priceSnapshot.findFirst({ where: { tokenId: ids.eth, recordedAt: { gte: new Date(Date.now() - HOUR) } }, orderBy: { recordedAt: "desc" } });
    const [row] = await sql(`SELECT id, "priceUsd"::text AS p FROM "PriceSnapshot" WHERE "tokenId" = $1 AND "recordedAt" >= now() - interval '1 hour' ORDER BY "recordedAt" DESC LIMIT 1`, [ids.eth]);
    expect(latest.id === row.id && latest.priceUsd.eq(row.p), `Prisma ${latest?.id} ${latest?.priceUsd}, SQL ${row.id} ${row.p}`);
  });
  await call("priceSnapshot.findUnique({ where: { id } })", async () => {
    const found = await app.priceSnapshot.findUnique({ where: { id: priceId } });
    expect(found?.priceUsd.eq("3001.25") && found.recordedAt.getTime() === priceAt.getTime(), `found ${JSON.stringify(found)}`);
    return { result: "documented difference", note: "works; the key is (id, \"recordedAt\"), so a lookup by id alone probes every monthly child's index" };
  });
  await call("priceSnapshot.count / aggregate", async () => {
    const count = await app.priceSnapshot.count({ where: { tokenId: ids.eth } });
    const agg = await app.priceSnapshot.aggregate({ where: { tokenId: ids.eth }, _max: { priceUsd: true, recordedAt: true }, _avg: { priceUsd: true }, _count: { _all: true } });
    const [row] = await sql(`SELECT count(*)::int AS n, max("priceUsd")::text AS mx, avg("priceUsd")::text AS av, ${iso('max("recordedAt")')} AS last FROM "PriceSnapshot" WHERE "tokenId" = $1`, [ids.eth]);
    expect(count === row.n && agg._count._all === row.n, `count ${count}, SQL ${row.n}`);
    expect(agg._max.priceUsd.eq(row.mx) && agg._max.recordedAt.toISOString() === row.last, `max ${agg._max.priceUsd} ${agg._max.recordedAt?.toISOString()}, SQL ${row.mx} ${row.last}`);
    expect(agg._avg.priceUsd.sub(row.av).abs().lt("1e-15"), `avg ${agg._avg.priceUsd}, SQL ${row.av}`);
  });

  let alicePortfolio;
  await call("portfolioSnapshot.create per wallet and with walletId: null, as sync-performance.ts", async () => {
    for (const w of ["alice", "bob", "carol", "dave"]) {
      const snap = await app.portfolioSnapshot.create({ data: { walletId: ids[w], totalUsdValue: new Prisma.Decimal("4700.25"), totalUsdValueChange24h: null, tokensTracked: 2, metadata: { chainId: 8453, label: w } } });
      if (w === "alice") alicePortfolio = snap;
      const row = await placed("PortfolioSnapshot", snap.id);
      expect(new RegExp(`^"PortfolioSnapshot_${month(snap.capturedAt)}_part_[0-3]"$`).test(row.part), `landed in ${row.part}`);
    }
    const combined = await app.portfolioSnapshot.create({ data: { walletId: null, totalUsdValue: "9400.5", tokensTracked: 8, metadata: { walletsCount: 4, captureType: "combined" } } });
    const row = await placed("PortfolioSnapshot", combined.id);
    expect(row.walletId === null && row.part === `"PortfolioSnapshot_${month(combined.capturedAt)}_part_0"`, `combined row ${JSON.stringify(row)}`);
    const [{ at }] = await sql(`SELECT ${iso('"capturedAt"')} AS at FROM "PortfolioSnapshot" WHERE id = $1`, [combined.id]);
    expect(at === combined.capturedAt.toISOString(), `capturedAt stored ${at}, Prisma ${combined.capturedAt.toISOString()} (TZ=${env.TZ})`);
  });
  await call("portfolioSnapshot.findFirst (walletId, capturedAt >= 24 h ago, newest) incl. walletId: null", async () => {
    for (const walletId of [ids.alice, null]) {
      const found = await app.portfolioSnapshot.findFirst({ where: { walletId, capturedAt: { gte: new Date(Date.now() - 24 * HOUR) } }, orderBy: { capturedAt: "desc" } });
      const [row] = await sql(`SELECT id FROM "PortfolioSnapshot" WHERE "walletId" IS NOT DISTINCT FROM $1 ORDER BY "capturedAt" DESC LIMIT 1`, [walletId]);
      expect(found?.id === row.id, `walletId ${walletId}: Prisma ${found?.id}, SQL ${row.id}`);
    }
  });

  let positionId;
  await call("positionSnapshot.create without capturedAt, exactly as sync-performance.ts", async () => {
    const created = await app.positionSnapshot.create({
      data: { portfolioSnapshotId: alicePortfolio.id, tokenId: ids.eth, walletId: ids.alice, quantity: new Prisma.Decimal("1.5"), usdValue: new Prisma.Decimal("4500.123456789012345678"), priceUsd: new Prisma.Decimal("4500.123456789012345678").div("1.5"), positionType: "liquid" },
    });
    positionId = created.id;
    const row = await placed("PositionSnapshot", created.id);
    expect(row.part === '"PositionSnapshot_default"' && row.capturedAt === null, `stored ${JSON.stringify({ part: row.part, capturedAt: row.capturedAt })}`);
    return { note: 'stored in "PositionSnapshot_default" with "capturedAt" NULL until complete_positions fills it from its PortfolioSnapshot and moves it into its month' };
  });
  let nested;
  await call("portfolioSnapshot.create with nested positionSnapshots.create", async () => {
    nested = await app.portfolioSnapshot.create({
      data: { walletId: ids.bob, totalUsdValue: "12.5", tokensTracked: 2, positionSnapshots: { create: [
        { tokenId: ids.usdc, walletId: ids.bob, quantity: "12.5", usdValue: "12.5", priceUsd: "1", positionType: "liquid" },
        { tokenId: ids.eth, walletId: ids.bob, quantity: "0.0033", usdValue: "0", priceUsd: "0", positionType: "staked", protocolId: ids.velo }] } },
      include: { positionSnapshots: true },
    });
    expect(nested.positionSnapshots.length === 2, `returned ${nested.positionSnapshots.length} positions`);
    const rows = await sql(`SELECT tableoid::regclass::text AS part, "capturedAt" FROM "PositionSnapshot" WHERE "portfolioSnapshotId" = $1`, [nested.id]);
    expect(rows.length === 2 && rows.every((r) => r.part === '"PositionSnapshot_default"' && r.capturedAt === null), `rows ${JSON.stringify(rows)}`);
  });
  await call("portfolioSnapshot.findUnique include positionSnapshots", async () => {
    const found = await app.portfolioSnapshot.findUnique({ where: { id: nested.id }, include: { positionSnapshots: true, wallet: true } });
    expectSame(found.positionSnapshots.map((p) => p.id), nested.positionSnapshots.map((p) => p.id), "positions");
    expect(found.wallet.id === ids.bob, "wallet relation");
  });
  await call("positionSnapshot.create for a PortfolioSnapshot that does not exist", async () => {
    const orphan = await app.positionSnapshot.create({ data: { portfolioSnapshotId: "no-such-portfolio", tokenId: ids.eth, walletId: ids.bob, quantity: "1", usdValue: "1", priceUsd: "1", positionType: "liquid" } });
    await placed("PositionSnapshot", orphan.id);
    await app.positionSnapshot.delete({ where: { id: orphan.id } });
    const rows = await sql('SELECT 1 FROM "PositionSnapshot" WHERE id = $1', [orphan.id]);
    expect(rows.length === 0, "positionSnapshot.delete left the row");
    return { result: "documented difference", note: "accepted (no database FK, so no P2003); the pipeline's position check reports such rows" };
  });
  await call("portfolioSnapshot.delete cascades to its positions (onDelete: Cascade)", async () => {
    await app.portfolioSnapshot.delete({ where: { id: nested.id } });
    const [{ n }] = await sql('SELECT count(*)::int AS n FROM "PositionSnapshot" WHERE "portfolioSnapshotId" = $1', [nested.id]);
    expect(n === 0, `${n} positions of the deleted PortfolioSnapshot remain`);
    const [{ kept }] = await sql('SELECT count(*)::int AS kept FROM "PositionSnapshot" WHERE id = $1', [positionId]);
    expect(kept === 1, "a position of another PortfolioSnapshot was deleted");
  });
  await call("portfolioSnapshot.deleteMany cascades to the positions of every deleted row", async () => {
    const old = new Date(now.getTime() - 40 * 24 * HOUR);
    for (let i = 0; i < 3; i++) {
      await app.portfolioSnapshot.create({ data: { walletId: ids.carol, totalUsdValue: "1", tokensTracked: 1, capturedAt: new Date(old.getTime() + i * HOUR),
        positionSnapshots: { create: [{ tokenId: ids.aero, walletId: ids.carol, quantity: "1", usdValue: "1", priceUsd: "1", positionType: "liquid" }] } } });
    }
    const deleted = await app.portfolioSnapshot.deleteMany({ where: { walletId: ids.carol, capturedAt: { lt: new Date(now.getTime() - 30 * 24 * HOUR) } } });
    const [{ n }] = await sql(`SELECT count(*)::int AS n FROM "PositionSnapshot" p WHERE p."walletId" = $1`, [ids.carol]);
    expect(deleted.count === 3 && n === 0, `deleted ${deleted.count}, ${n} positions remain`);
  });

  await call("alert.create / alertDelivery.create / alert.findUnique include deliveries", async () => {
    const alert = await app.alert.create({ data: { type: "price_threshold", severity: "warning", title: "ETH below 3000", contextHash: `ctx-${Date.now()}`, walletId: ids.alice, tokenId: ids.eth, metadata: { threshold: "3000" } } });
    await app.alertDelivery.create({ data: { alertId: alert.id, channel: "console", success: true } });
    const found = await app.alert.findUnique({ where: { id: alert.id }, include: { deliveries: true } });
    const [row] = await sql(`SELECT status, ${iso('"triggerAt"')} AS t, (SELECT count(*)::int FROM "AlertDelivery" d WHERE d."alertId" = a.id) AS n FROM "Alert" a WHERE id = $1`, [alert.id]);
    expect(found.deliveries.length === 1 && row.n === 1 && row.status === "pending" && found.triggerAt.toISOString() === row.t, `Prisma ${JSON.stringify(found)}, SQL ${JSON.stringify(row)}`);
  });
  await call("governanceLock.upsert on protocolId_walletId, assetCorrelation.create", async () => {
    for (const [p, w, amount, power, boost, ends] of [["velo", "alice", "1000", "250.5", null, null],
      ["aerodrome", "alice", "5000.000000000000000001", "4999.9", "1.5", new Date(now.getTime() + 365 * 24 * HOUR)],
      ["velo", "carol", "0.0000005", "0.0000005", null, null]]) {
      await app.governanceLock.upsert({
        where: { protocolId_walletId: { protocolId: ids[p], walletId: ids[w] } },
        update: { lockAmount: amount }, create: { protocolId: ids[p], walletId: ids[w], lockAmount: amount, votingPower: power, boostMultiplier: boost, lockEndsAt: ends },
      });
    }
    await app.assetCorrelation.create({ data: { token1Id: ids.eth, token2Id: ids.aero, timeframe: "30d", correlation: "0.87654321", pValue: "0.00012345", sampleSize: 720 } });
    const [{ n }] = await sql('SELECT count(*)::int AS n FROM "GovernanceLock"');
    expect(n === 3, `${n} locks`);
  });
  await call("wallet.delete cascades into TokenBalance, PortfolioSnapshot, PositionSnapshot", async () => {
    const snap = await app.portfolioSnapshot.create({ data: { walletId: ids.dave, totalUsdValue: "3000", tokensTracked: 1,
      positionSnapshots: { create: [{ tokenId: ids.eth, walletId: ids.dave, quantity: "1", usdValue: "3000", priceUsd: "3000", positionType: "liquid" }] } } });
    await app.wallet.delete({ where: { id: ids.dave } });
    const [row] = await sql(`SELECT (SELECT count(*) FROM "TokenBalance" WHERE "walletId" = $1)::int AS b,
                                    (SELECT count(*) FROM "PortfolioSnapshot" WHERE "walletId" = $1)::int AS s,
                                    (SELECT count(*) FROM "PositionSnapshot" WHERE "walletId" = $1 OR "portfolioSnapshotId" = $2)::int AS p`, [ids.dave, snap.id]);
    expect(row.b === 0 && row.s === 0 && row.p === 0, `left behind: ${JSON.stringify(row)}`);
  });

  await waitForReplay(env.DATABASE_URL_READ, "DATABASE_URL_READ");
  await waitForReplay(env.DATABASE_URL_ANALYTICS, "DATABASE_URL_ANALYTICS");
  await call("DatabaseManager.getPortfolioSummary (read replica) = SQL on the primary", async () => {
    const [{ standby }] = await db.readReplica.$queryRaw`SELECT pg_is_in_recovery() AS standby`;
    expect(standby === true, "DATABASE_URL_READ is not a replica");
    for (const w of ["alice", "bob", "carol"]) {
      expectSame(await db.getPortfolioSummary(ids[w]), await expectedPortfolio(ids[w]), `getPortfolioSummary(${w})`);
    }
    expectSame(await db.getPortfolioSummary("no-such-wallet"), [], "an unknown wallet");
  });
  await call("DatabaseManager.calculateRiskMetrics (analytics replica) = SQL on the primary", async () => {
    const [{ standby }] = await db.analyticsReplica.$queryRaw`SELECT pg_is_in_recovery() AS standby`;
    expect(standby === true, "DATABASE_URL_ANALYTICS is not a replica");
    const got = await db.calculateRiskMetrics("30d");
    const rows = await sql(`SELECT id, "token1Id", "token2Id", timeframe, correlation::text AS correlation, "pValue"::text AS "pValue", "sampleSize", ${iso('"computedAt"')} AS "computedAt", metadata FROM "AssetCorrelation" WHERE timeframe = '30d' AND "computedAt" >= now() - interval '1 day'`);
    expect(rows.length === 1, `${rows.length} correlations in SQL`);
    expectSame(got, rows.map((r) => ({ ...r, correlation: dec(r.correlation), pValue: dec(r.pValue) })), "calculateRiskMetrics('30d')");
  });
  report.wallets = { alice: ids.alice, bob: ids.bob, carol: ids.carol };
}

// -- phase 2: the seed's CacheManager over keys the pipeline refreshed --------------------------

async function cachePhase() {
  const redis = new Redis(env.REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1 });
  await redis.connect();
  const loads = { portfolio: 0, price: 0, governance: 0 };
  const counted = {
    getPortfolioSummary: (id) => { loads.portfolio++; return db.getPortfolioSummary(id); },
    getLatestPrice: (id) => { loads.price++; return db.getLatestPrice(id); },
    getGovernanceLocks: (id) => { loads.governance++; return db.getGovernanceLocks(id); },
  };
  const cache = new CacheManager(redis, counted);
  const wallets = await sql('SELECT id FROM "Wallet" ORDER BY id');
  const prices = await sql(`SELECT DISTINCT ON ("tokenId") "tokenId" AS id, "priceUsd"::text AS p FROM "PriceSnapshot"
                             WHERE "recordedAt" >= now() - interval '7 days' ORDER BY "tokenId", "recordedAt" DESC, source DESC`);
  await call("CacheManager.getLatestPrice: parseFloat of price:latest:<tokenId> = the database value", async () => {
    expect(prices.length === 4, `${prices.length} tokens priced in the last 7 days`);
    for (const { id, p } of prices) {
      const raw = await redis.get(`price:latest:${id}`);
      expect(raw !== null, `price:latest:${id} is missing`);
      expect(/^-?\d+(\.\d+)?$/.test(raw) && new Prisma.Decimal(raw).eq(p), `price:latest:${id} = ${JSON.stringify(raw)}, the database holds ${p}`);
      const read = await cache.getLatestPrice(id);
      expect(read === Number(p) && !Number.isNaN(read), `parseFloat gave ${read}, the database value is ${p}`);
      const ttl = await redis.ttl(`price:latest:${id}`);
      expect(ttl > 0 && ttl <= 60, `TTL ${ttl}`);
    }
    expect(loads.price === 0, `${loads.price} prices were read from the database: not cache hits`);
  });
  await call("CacheManager.getPortfolioSummary: JSON.parse of portfolio:<walletId> = getPortfolioSummary through Prisma", async () => {
    for (const { id } of wallets) {
      const raw = await redis.get(`portfolio:${id}`);
      expect(raw !== null, `portfolio:${id} is missing`);
      const read = await cache.getPortfolioSummary(id);
      expectSame(read, await db.getPortfolioSummary(id), `portfolio:${id}`);
      const ttl = await redis.ttl(`portfolio:${id}`);
      expect(ttl > 0 && ttl <= 300, `TTL ${ttl}`);
    }
    expect(loads.portfolio === 0, `${loads.portfolio} portfolios were read from the database: not cache hits`);
  });
  await call("CacheManager.getGovernanceLocks: JSON.parse of governance:<walletId> = governanceLock.findMany", async () => {
    for (const { id } of wallets) {
      const read = await cache.getGovernanceLocks(id);
      expectSame(read, await db.getGovernanceLocks(id), `governance:${id}`);
      expectSame(read, await expectedLocks(id), `governance:${id} against SQL`);
      const ttl = await redis.ttl(`governance:${id}`);
      expect(ttl > 0 && ttl <= 1800, `TTL ${ttl}`);
    }
    expect(loads.governance === 0, `${loads.governance} lock lists were read from the database: not cache hits`);
  });
  // The app's own miss path writes a value; the pytest side then checks the pipeline's next
  // refresh finds the same bytes (so it renews the TTL instead of rewriting the key).
  report.appWritten = {};
  await call("CacheManager miss: the app stores JSON.stringify of the Prisma result (BigInt rule installed)", async () => {
    const carol = (await sql(`SELECT id FROM "Wallet" WHERE label = 'Carol'`))[0].id;
    for (const key of [`portfolio:${carol}`, `governance:${carol}`]) await redis.del(key);
    await cache.getPortfolioSummary(carol);
    await cache.getGovernanceLocks(carol);
    expect(loads.portfolio === 1 && loads.governance === 1, "the misses did not read the database");
    for (const key of [`portfolio:${carol}`, `governance:${carol}`]) report.appWritten[key] = await redis.get(key);
  });
  await redis.quit();
  await rollupReads();
}

// The rollup tables (sql/0012_rollups.sql, the models after the ROLLUPS marker of
// prisma/schema.prisma), which the pytest side refreshed between the phases, read through
// the app's client: every row, its key and values, as SQL holds them.
async function rollupReads() {
  for (const [model, table, key, values] of [
    ["priceRollupHourly", "PriceRollupHourly", "tokenId", ["openUsd", "highUsd", "lowUsd", "closeUsd", "sumUsd"]],
    ["priceRollupDaily", "PriceRollupDaily", "tokenId", ["openUsd", "highUsd", "lowUsd", "closeUsd", "sumUsd"]],
    ["portfolioRollupDaily", "PortfolioRollupDaily", "walletId", ["openUsd", "closeUsd", "minUsd", "maxUsd"]],
  ]) {
    await call(`prisma.${model}.findMany = SQL (the rollups as Prisma models)`, async () => {
      const got = await app[model].findMany();
      const rows = await sql(`SELECT "${key}" AS key, ${iso('"bucketStart"')} AS "bucketStart", "sampleCount",
                                     ${values.map((v) => `"${v}"::text AS "${v}"`).join(", ")} FROM "${table}"`);
      expect(rows.length > 0, `${table} is empty: the rollups were not refreshed`);
      const shape = (r, k) => ({ key: r[k], bucketStart: typeof r.bucketStart === "string" ? r.bucketStart : r.bucketStart.toISOString(),
                                 sampleCount: r.sampleCount, ...Object.fromEntries(values.map((v) => [v, dec(String(r[v]))])) });
      expectSame(got.map((r) => shape(r, key)), rows.map((r) => shape(r, "key")), `${model}.findMany()`);
    });
  }
  await call("prisma.portfolioRollupDaily: the all-wallets row (walletId null) and the compound unique key", async () => {
    const all = await app.portfolioRollupDaily.findMany({ where: { walletId: null } });
    expect(all.length > 0, "no all-wallets rollup row");
    const [one] = await app.portfolioRollupDaily.findMany({ where: { walletId: { not: null } }, take: 1 });
    const found = await app.portfolioRollupDaily.findUnique({
      where: { walletId_bucketStart: { walletId: one.walletId, bucketStart: one.bucketStart } } });
    expect(found?.id === one.id, "findUnique by (walletId, bucketStart) did not find the row");
  });
}

try {
  if (phase === "prisma") await prismaPhase();
  else if (phase === "cache") await cachePhase();
  else fail(`usage: node app_compat/suite.mjs prisma|cache (got ${phase})`);
} finally {
  await db.disconnect();
  await sqlPool.end();
}
console.log(JSON.stringify(report));
if (failures.length) {
  console.error(`app-compat ${phase}: ${failures.length} of ${results.length} calls failed:\n${failures.join("\n\n")}`);
  process.exit(1);
}
