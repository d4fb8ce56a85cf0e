// The seed's (docs/database-scalability-strategy.md) DatabaseManager and CacheManager, as
// WeDefiDaily would run them on Prisma 7. What changed from the seed, and why:
//   * Prisma 7: `new PrismaClient({ datasources: { db: { url } } })` is gone; each client
//     takes a driver adapter (`@prisma/adapter-pg`) built from its URL.
//   * The seed's CacheManager calls `dbManager.getLatestPrice` and
//     `dbManager.getGovernanceLocks`, which its DatabaseManager never defines: both are
//     written here as the obvious Prisma reads on the read replica.
//   * BigInt: JSON.stringify throws on one ("TokenBalance"."blockNumber" is a BigInt), so
//     the app must install the rule below before caching a portfolio; with it a BigInt is
//     written as its decimal digits in a JSON string, the form the pipeline writes too.
// Nothing else: the read logic (parseFloat for prices, JSON.parse for the rest) and the
// TTLs (60 s, 300 s, 1800 s) are the seed's.
import { PrismaClient } from "@prisma/client";
import { PrismaPg } from "@prisma/adapter-pg";

// The rule the app must adopt (README "Pointing WeDefiDaily at a database this project manages").
BigInt.prototype.toJSON = function toJSON() {
  return this.toString();
};

export function prismaClient(connectionString) {
  return new PrismaClient({ adapter: new PrismaPg({ connectionString }) });
}

export class DatabaseManager {
  constructor(env = process.env) {
    this.primaryClient = prismaClient(env.DATABASE_URL_PRIMARY);
    this.readReplica = prismaClient(env.DATABASE_URL_READ);
    this.analyticsReplica = prismaClient(env.DATABASE_URL_ANALYTICS);
  }

  // Portfolio queries route to read replica
  async getPortfolioSummary(walletId) {
    return this.readReplica.wallet.findMany({
      where: { id: walletId },
      include: {
        balances: {
          include: { token: true },
          where: { usdValue: { gt: 0 } },
        },
      },
    });
  }

  // Analytics queries route to dedicated replica
  async calculateRiskMetrics(timeframe) {
    return this.analyticsReplica.assetCorrelation.findMany({
      where: { timeframe, computedAt: { gte: new Date(Date.now() - 86400000) } },
    });
  }

  // Write operations route to primary
  async updateTokenBalance(balanceData) {
    return this.primaryClient.tokenBalance.upsert({
      where: { walletId_tokenId: { walletId: balanceData.walletId, tokenId: balanceData.tokenId } },
      update: balanceData,
      create: balanceData,
    });
  }

  // Called by the seed's CacheManager, missing from its DatabaseManager.
  async getLatestPrice(tokenId) {
    const row = await this.readReplica.priceSnapshot.findFirst({
      where: { tokenId },
      orderBy: { recordedAt: "desc" },
    });
    return row === null ? null : row.priceUsd.toNumber();
  }

  async getGovernanceLocks(walletId) {
    return this.readReplica.governanceLock.findMany({ where: { walletId } });
  }

  async disconnect() {
    await Promise.all([this.primaryClient, this.readReplica, this.analyticsReplica].map((c) => c.$disconnect()));
  }
}

export class CacheManager {
  constructor(redis, dbManager) {
    this.redis = redis;
    this.dbManager = dbManager;
  }

  // Portfolio summary cache (TTL: 5 minutes)
  async getPortfolioSummary(walletId) {
    const cacheKey = `portfolio:${walletId}`;
    const cached = await this.redis.get(cacheKey);

    if (cached) {
      return JSON.parse(cached);
    }

    const summary = await this.dbManager.getPortfolioSummary(walletId);
    await this.redis.setex(cacheKey, 300, JSON.stringify(summary));
    return summary;
  }

  // Price data cache (TTL: 1 minute)
  async getLatestPrice(tokenId) {
    const cacheKey = `price:latest:${tokenId}`;
    const cached = await this.redis.get(cacheKey);

    if (cached) {
      return parseFloat(cached);
    }

    const price = await this.dbManager.getLatestPrice(tokenId);
    await this.redis.setex(cacheKey, 60, price.toString());
    return price;
  }

  // Governance data cache (TTL: 30 minutes)
  async getGovernanceLocks(walletId) {
    const cacheKey = `governance:${walletId}`;
    const cached = await this.redis.get(cacheKey);

    if (cached) {
      return JSON.parse(cached);
    }

    const locks = await this.dbManager.getGovernanceLocks(walletId);
    await this.redis.setex(cacheKey, 1800, JSON.stringify(locks));
    return locks;
  }
}
