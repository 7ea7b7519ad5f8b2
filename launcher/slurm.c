/* slurm.c: what a job learns from Slurm, and the world-size check for srun.
 *
 * Slurm describes a job step in the environment of every task (SLURM_JOB_ID,
 * SLURM_STEP_ID, SLURM_JOB_NODELIST, ...). Records carry these so that a result can be
 * traced to its job. A task started by srun directly (not by mpirun inside an
 * allocation, which sets OMPI_COMM_WORLD_SIZE and drops SLURM_STEP_NUM_TASKS) must see
 * an MPI world of exactly the step's task count: srun without a working PMI plugin
 * starts N singletons that each believe they are rank 0 of 1, and would all run the
 * whole experiment and write the same outputs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launcher.h"

static const char *env_or(const char *name, const char *fallback) {
    const char *v = getenv(name);
    return v && *v ? v : fallback;
}

int spar__slurm_check_world(int world_size) {
    const char *tasks = env_or("SLURM_STEP_NUM_TASKS", NULL);
    if (!tasks || getenv("OMPI_COMM_WORLD_SIZE")) return SPAR_OK; /* not a direct srun */
    int expected = atoi(tasks);
    if (expected <= 0 || expected == world_size) return SPAR_OK;
    return spar_errorf(SPAR_EINVAL,
                       "srun started %d tasks (SLURM_STEP_NUM_TASKS) but MPI sees a world of %d "
                       "(task %s of job %s): srun did not connect the tasks through PMIx. Use "
                       "`srun --mpi=pmix` (`srun --mpi=list` shows this cluster's plugins) or "
                       "`mpirun` inside the allocation",
                       expected, world_size, env_or("SLURM_PROCID", "?"),
                       env_or("SLURM_JOB_ID", "?"));
}

int spar__slurm_check_launch(void) {
    const char *tasks = env_or("SLURM_STEP_NUM_TASKS", NULL);
    if (!tasks || atoi(tasks) <= 1 || getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK") ||
        getenv("PMI_RANK") || getenv("PMI_FD"))
        return SPAR_OK;
    return spar_errorf(SPAR_EINVAL,
                       "srun started %s tasks without a PMI plugin (task %s, SLURM_MPI_TYPE=%s): "
                       "MPI cannot join them into one world. Use `srun --mpi=pmix` (`srun "
                       "--mpi=list` shows this cluster's plugins) or `mpirun` inside the "
                       "allocation",
                       tasks, env_or("SLURM_PROCID", "?"), env_or("SLURM_MPI_TYPE", "none"));
}

static void json_field(FILE *f, const char *key, const char *env, bool first) {
    const char *v = getenv(env);
    fprintf(f, "%s\"%s\":", first ? "" : ",", key);
    if (v)
        spar__json_string(f, v);
    else
        fputs("null", f);
}

/* The partition, or for a heterogeneous job each component's, joined by commas in
 * component order ("debug,memory"). */
static void json_partitions(FILE *f) {
    const char *size = getenv("SLURM_HET_SIZE");
    int n = size ? atoi(size) : 0;
    if (n < 2 || n > 64) {
        json_field(f, "partition", "SLURM_JOB_PARTITION", false);
        return;
    }
    char all[1024] = "", key[64];
    for (int i = 0; i < n; i++) {
        snprintf(key, sizeof key, "SLURM_JOB_PARTITION_HET_GROUP_%d", i);
        size_t at = strlen(all);
        snprintf(all + at, sizeof all - at, "%s%s", i ? "," : "", env_or(key, "?"));
    }
    fputs(",\"partition\":", f);
    spar__json_string(f, all);
}

void spar__json_slurm(FILE *f) {
    fputs(",\"slurm\":", f);
    if (!getenv("SLURM_JOB_ID")) {
        fputs("null", f);
        return;
    }
    fputc('{', f);
    json_field(f, "job_id", "SLURM_JOB_ID", true);
    json_field(f, "job_name", "SLURM_JOB_NAME", false);
    json_field(f, "step_id", "SLURM_STEP_ID", false);
    json_field(f, "nodelist", "SLURM_JOB_NODELIST", false);
    json_field(f, "ntasks", "SLURM_NTASKS", false);
    json_field(f, "tasks_per_node", "SLURM_TASKS_PER_NODE", false);
    json_field(f, "cpus_per_task", "SLURM_CPUS_PER_TASK", false);
    json_partitions(f);
    fputc('}', f);
}
