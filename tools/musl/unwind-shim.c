/* What gcc's unwinder (libgcc_eh.a of Debian 12's gcc, built against glibc) needs from glibc
   when it is linked into the musl-static agent as the `unwind` library of Rust's std (rustup
   cannot fetch the musl target's own libunwind here; tools/lib.sh build_static_agent).

   _dl_find_object (glibc >= 2.35): the object holding an address and its PT_GNU_EH_FRAME
   segment, found here with dl_iterate_phdr, which musl has (also in static binaries). */
#define _GNU_SOURCE
#include <link.h>
#include <stddef.h>
#include <stdint.h>

struct dl_find_object {
  unsigned long long dlfo_flags;
  void *dlfo_map_start;
  void *dlfo_map_end;
  struct link_map *dlfo_link_map;
  void *dlfo_eh_frame;
  unsigned long long dlfo_reserved[7];
};

struct query {
  uintptr_t pc;
  struct dl_find_object *out;
  int found;
};

static int visit(struct dl_phdr_info *info, size_t size, void *data) {
  struct query *q = data;
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  void *eh = NULL;
  int hit = 0;
  (void)size;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *p = &info->dlpi_phdr[i];
    uintptr_t start = info->dlpi_addr + p->p_vaddr;
    if (p->p_type == PT_LOAD) {
      if (start < lo) lo = start;
      if (start + p->p_memsz > hi) hi = start + p->p_memsz;
      if (q->pc >= start && q->pc < start + p->p_memsz) hit = 1;
    } else if (p->p_type == PT_GNU_EH_FRAME) {
      eh = (void *)start;
    }
  }
  if (!hit) return 0;
  q->out->dlfo_flags = 0;
  q->out->dlfo_map_start = (void *)lo;
  q->out->dlfo_map_end = (void *)hi;
  q->out->dlfo_link_map = NULL;
  q->out->dlfo_eh_frame = eh;
  q->found = 1;
  return 1;
}

int _dl_find_object(void *pc, struct dl_find_object *result) {
  struct query q = {(uintptr_t)pc, result, 0};
  dl_iterate_phdr(visit, &q);
  return q.found ? 0 : -1;
}

/* gcc's unwinder calls the pthread functions through weak references, which a static link
   resolves only if something else pulls them in (to null otherwise: uw_init_context_1 calls
   pthread_once). Referencing them here pulls them in whenever the unwinder is linked. */
#include <pthread.h>
__attribute__((used)) static void *const keep_gthr[] = {
  (void *)pthread_once, (void *)pthread_mutex_lock, (void *)pthread_mutex_unlock,
  (void *)pthread_key_create, (void *)pthread_key_delete, (void *)pthread_getspecific,
  (void *)pthread_setspecific,
};
