"""Adoption of a live WeDefiDaily database: the app's Prisma-built tables converted to the
partitioned layout of sql/, online, with nothing lost (docs/adoption.md).

One module per concern: `layout` (what is converted, names, lock keys), `model` (the
target, replayed from sql/), `shape` (refusals), `shadow` (staging + capture triggers),
`placing` (rows into the new tables or set aside), `copy` (history, whole months),
`replay` (the change log), `verify`, `carry` (owner, grants, triggers, ...), `swap`
(the swap and the finish), `state` (resume), `plan` (--plan), `run` (the order of it
all: `adopt`, `abort`), `cli`.
"""
