"""The card core: six business modules (issuing, limits, installments, authorization,
accounting, common) served per cell on PostgreSQL, plus the platform plumbing (HTTP, database,
group commit) and the gateway that routes every request to its cell.

Never: log a full card number, let a journal entry that does not balance reach the database.
"""
