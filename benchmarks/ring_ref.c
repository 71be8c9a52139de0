/*
 * Reference for benchmarks/ring.py: the same device-end loop in C over the Linux UAPI structs.
 *
 * Usage: ring_ref CHAIN_LEN INDIRECT SECONDS   -> prints "<descriptors per second>\n"
 *
 * Same layout as the Python benchmark (queue size 256, split layout from guest address 0, 512-byte
 * segments at 1 MiB, indirect tables at 3 MiB, 4 MiB of RAM) and the same checks per chain: avail
 * idx distance, head range, head not in flight, per descriptor a non-zero length inside RAM,
 * readable before writable, next in range, at most N buffers, total length at most 2^32, and for
 * an INDIRECT descriptor the feature, no NEXT, a non-empty table of whole entries (at most 65536)
 * inside RAM and no nesting. Each buffer is recorded as an (addr, len) pair like the Python
 * Segment. Little-endian host assumed (the virtio fields are read natively).
 */
#include <linux/virtio_ring.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define QSIZE 256u
#define RAM_SIZE (4u << 20)
#define DATA (1u << 20)
#define TABLES (3u << 20)
#define SEG_LEN 512u

struct seg { uint64_t addr; uint32_t len; };

static uint8_t *ram;
static struct vring_desc *desc;
static struct vring_avail *avail;
static struct vring_used *used;
static int32_t flight[QSIZE];
static uint16_t next_avail, shadow_avail, next_used;
static int indirect_ok;
static struct seg readable[QSIZE], writable[QSIZE];
static uint64_t checksum;

static int in_ram(uint64_t addr, uint32_t len)
{
	return len && addr <= RAM_SIZE && (uint64_t)len <= RAM_SIZE - addr;
}

/* Returns the head, -1 when nothing is available, -2 on a violation. */
static int pop(void)
{
	if (shadow_avail == next_avail) {
		uint16_t idx = avail->idx;
		if (idx == next_avail)
			return -1;
		if ((uint16_t)(idx - next_avail) > QSIZE)
			return -2;
		shadow_avail = idx;
	}
	uint16_t head = avail->ring[next_avail & (QSIZE - 1)];
	if (head >= QSIZE || flight[head] >= 0)
		return -2;
	const struct vring_desc *table = desc;
	unsigned limit = QSIZE, i = head, nr = 0, nw = 0, count = 0, in_table = 0;
	uint64_t total = 0, wlen = 0;
	for (;;) {
		const struct vring_desc *d = &table[i];
		uint64_t addr = d->addr;
		uint32_t len = d->len;
		uint16_t flags = d->flags, next = d->next;
		if (flags & VRING_DESC_F_INDIRECT) {
			if (in_table || !indirect_ok || (flags & VRING_DESC_F_NEXT) || len == 0 ||
			    (len & 15) || len > 16u * 65536u || !in_ram(addr, len))
				return -2;
			table = (const struct vring_desc *)(ram + addr);
			limit = len / 16;
			in_table = 1;
			i = 0;
			continue;
		}
		if (!in_ram(addr, len))
			return -2;
		if (flags & VRING_DESC_F_WRITE) {
			writable[nw].addr = addr;
			writable[nw++].len = len;
			wlen += len;
		} else {
			if (nw)
				return -2;
			readable[nr].addr = addr;
			readable[nr++].len = len;
		}
		total += len;
		if (!(flags & VRING_DESC_F_NEXT))
			break;
		if (next >= limit || ++count >= QSIZE)
			return -2;
		i = next;
	}
	if (total > (1ull << 32))
		return -2;
	flight[head] = (int32_t)wlen;
	checksum += nr + nw + readable[0].len;
	next_avail++;
	return head;
}

static int push(unsigned head, uint32_t written)
{
	if (head >= QSIZE || flight[head] < 0 || written > (uint32_t)flight[head])
		return -1;
	flight[head] = -1;
	used->ring[next_used & (QSIZE - 1)].id = head;
	used->ring[next_used & (QSIZE - 1)].len = written;
	used->idx = ++next_used;
	return 0;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts); /* CPU time, as the Python side */
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s CHAIN_LEN INDIRECT SECONDS\n", argv[0]);
		return 2;
	}
	unsigned chain_len = (unsigned)atoi(argv[1]);
	int indirect = atoi(argv[2]);
	double seconds = atof(argv[3]);
	if (chain_len < 1 || chain_len > QSIZE)
		return 2;
	ram = aligned_alloc(4096, RAM_SIZE);
	if (!ram)
		return 1;
	memset(ram, 0, RAM_SIZE);
	indirect_ok = indirect;
	size_t avail_off = 16 * QSIZE, used_off = (avail_off + 6 + 2 * QSIZE + 3) & ~(size_t)3;
	desc = (struct vring_desc *)ram;
	avail = (struct vring_avail *)(ram + avail_off);
	used = (struct vring_used *)(ram + used_off);
	unsigned step = indirect ? 1 : chain_len, chains = QSIZE / step;
	unsigned nread = chain_len == 1 ? 1 : chain_len / 2;
	for (unsigned c = 0; c < chains; c++) {
		struct vring_desc *t = indirect ? (struct vring_desc *)(ram + TABLES + c * 16 * chain_len)
						: &desc[c * step];
		for (unsigned j = 0; j < chain_len; j++) {
			t[j].addr = DATA + (uint64_t)(c * chain_len + j) * SEG_LEN;
			t[j].len = SEG_LEN;
			t[j].flags = (j < nread ? 0 : VRING_DESC_F_WRITE) |
				     (j + 1 < chain_len ? VRING_DESC_F_NEXT : 0);
			t[j].next = j + 1 < chain_len ? (indirect ? j + 1 : c * step + j + 1) : 0;
		}
		if (indirect) {
			desc[c].addr = TABLES + c * 16 * chain_len;
			desc[c].len = 16 * chain_len;
			desc[c].flags = VRING_DESC_F_INDIRECT;
			desc[c].next = 0;
		}
	}
	for (unsigned s = 0; s < QSIZE; s++)
		avail->ring[s] = (s % chains) * step;
	for (unsigned h = 0; h < QSIZE; h++)
		flight[h] = -1;

	uint16_t idx = 0;
	unsigned long rounds = 0;
	double start = now(), end;
	for (;;) {
		idx += chains;
		avail->idx = idx;
		int head;
		while ((head = pop()) >= 0)
			push((unsigned)head, 0);
		if (head == -2) {
			fprintf(stderr, "violation\n");
			return 1;
		}
		if (++rounds % 1024 == 0 && (end = now()) - start >= seconds)
			break;
	}
	printf("%.0f\n", (double)rounds * chains * chain_len / (end - start));
	fprintf(stderr, "checksum %llu\n", (unsigned long long)checksum);
	free(ram);
	return 0;
}
