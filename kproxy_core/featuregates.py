"""The feature gates upstream kube-proxy recognises, and how ``--feature-gates`` /
``featureGates:`` are checked against them.

Upstream (component-base ``featuregate``) rejects a gate it does not know ("unrecognized
feature gate: X") and a locked gate set away from its default, and warns when a GA or
deprecated gate is set. kube-proxy's binary registers every Kubernetes gate (kube, apiserver,
client-go, component-base logging/metrics), so an operator's existing flags may name any of
them: kproxy accepts all of those, logs one line for each it does not act on, and rejects the
rest with upstream's message, exit 2.

The table is upstream's ``test/compatibility_lifecycle/reference/versioned_feature_list.yaml``
(the newest version of it the project could read: the v1.34/v1.35 development line) plus
client-go's ``features/known_features.go``, each gate at its newest spec. Gates added upstream
after that are unknown here and rejected: add a row (name, default, stage, ``locked``) when
upstream adds one; keep rows of removed gates until upstream's n-3 compatibility window ends.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from kproxy_core.options import BOOLEAN, MAPPING, OptionError


@attrs.frozen
class Gate:
    name: str
    default: bool
    #: "Alpha", "Beta", "GA" or "Deprecated"
    stage: str
    #: Upstream refuses any value but the default (GA or deprecated gates about to go).
    locked: bool = False


_STAGES = {"A": "Alpha", "B": "Beta", "GA": "GA", "D": "Deprecated"}

# name, default, stage (A/B/GA/D), "locked" when locked to the default
_TABLE = """
AggregatedDiscoveryRemoveBetaType true D
AllowDNSOnlyNodeCSR false D
AllowInsecureKubeletCertificateSigningRequests false D
AllowOverwriteTerminationGracePeriodSeconds false D
AllowParsingUserUIDFromCertAuth true B
AllowServiceLBStatusOnNonLB false D locked
AllowUnsafeMalformedObjectDeletion false A
AnonymousAuthConfigurableEndpoints true GA locked
AnyVolumeDataSource true GA locked
APIResponseCompression true B
APIServerIdentity true B
APIServerTracing true B
APIServingWithRoutine false A
AuthorizeNodeWithSelectors true GA locked
AuthorizeWithSelectors true GA locked
BtreeWatchCache true GA locked
CBORServingAndStorage false A
ClearingNominatedNodeNameAfterBinding true B
ClientsAllowCBOR false A
ClientsPreferCBOR false A
CloudControllerManagerWebhook false A
ClusterTrustBundle false B
ClusterTrustBundleProjection false B
ComponentFlagz false A
ComponentSLIs true GA locked
ComponentStatusz false A
ConcurrentWatchObjectDecode false B
ConsistentListFromCache true GA locked
ContainerCheckpoint true B
ContainerStopSignals false A
ContextualLogging true B
CoordinatedLeaderElection false B
CPUCFSQuotaPeriod false A
CPUManagerPolicyAlphaOptions false A
CPUManagerPolicyBetaOptions true B
CPUManagerPolicyOptions true GA locked
CRDValidationRatcheting true GA locked
CronJobsScheduledAnnotation true GA locked
CrossNamespaceVolumeDataSource false A
CSIMigrationPortworx true GA locked
CSIVolumeHealth false A
CustomResourceFieldSelectors true GA locked
DeclarativeValidation true B
DeclarativeValidationTakeover false B
DeploymentReplicaSetTerminatingReplicas false A
DetectCacheInconsistency true B
DevicePluginCDIDevices true GA locked
DisableAllocatorDualWrite true GA
DisableCPUQuotaWithExclusiveCPUs true B
DisableNodeKubeProxyVersion true D
DRAAdminAccess false A
DRADeviceTaints false A
DRAPartitionableDevices false A
DRAPrioritizedList false A
DRAResourceClaimDeviceStatus true B
DRASchedulerFilterTimeout true B
DynamicResourceAllocation false B
EventedPLEG false A
ExecProbeTimeout true GA
ExternalServiceAccountTokenSigner true B
GitRepoVolumeDriver false D
GracefulNodeShutdown true B
GracefulNodeShutdownBasedOnPodPriority true B
HonorPVReclaimPolicy true GA locked
HPAConfigurableTolerance false A
HPAScaleToZero false A
ImageMaximumGCAge true B
ImageVolume false B
InformerResourceVersion true GA
InOrderInformers true B
InPlacePodVerticalScaling true B
InPlacePodVerticalScalingAllocatedStatus false D
InPlacePodVerticalScalingExclusiveCPUs false A
InTreePluginPortworxUnregister false A
JobBackoffLimitPerIndex true GA locked
JobManagedBy true B
JobPodReplacementPolicy true GA locked
JobSuccessPolicy true GA locked
KMSv1 false D
KubeletCgroupDriverFromCRI true B
KubeletCrashLoopBackOffMax false A
KubeletEnsureSecretPulledImages false A
KubeletFineGrainedAuthz true B
KubeletInUserNamespace false A
KubeletPodResourcesDynamicResources false A
KubeletPodResourcesGet false A
KubeletPodResourcesListUseActivePods true D
KubeletPSI false A
KubeletRegistrationGetOnExistsOnly false D
KubeletSeparateDiskGC true B
KubeletServiceAccountTokenForCredentialProviders false A
KubeletTracing true GA locked
LegacySidecarContainers false D
ListFromCacheSnapshot true B
LoadBalancerIPMode true GA locked
LocalStorageCapacityIsolationFSQuotaMonitoring false B
LogarithmicScaleDown true GA locked
LoggingAlphaOptions false A
LoggingBetaOptions true B
MatchLabelKeysInPodAffinity true GA locked
MatchLabelKeysInPodTopologySpread true B
MatchLabelKeysInPodTopologySpreadSelectorMerge true B
MaxUnavailableStatefulSet false A
MemoryManager true GA locked
MemoryQoS false A
MultiCIDRServiceAllocator true GA locked
MutableCSINodeAllocatableCount false A
MutatingAdmissionPolicy false B
NFTablesProxyMode true GA locked
NodeInclusionPolicyInPodTopologySpread true GA locked
NodeLogQuery false B
NodeSwap true GA locked
NominatedNodeNameForExpectation true B
OpenAPIEnums true B
OrderedNamespaceDeletion true GA locked
PodAndContainerStatsFromCRI false A
PodDeletionCost true B
PodIndexLabel true GA locked
PodLevelResources false A
PodLifecycleSleepAction true B
PodLifecycleSleepActionAllowZero true B
PodLogsQuerySplitStreams false A
PodObservedGenerationTracking false A
PodReadyToStartContainersCondition true B
PodSchedulingReadiness true GA locked
PodTopologyLabelsAdmission false A
PortForwardWebsockets true B
PreferSameTrafficDistribution true B
PreventStaticPodAPIReferences true B
ProcMountType true B
QOSReserved false A
RecoverVolumeExpansionFailure true GA locked
RecursiveReadOnlyMounts true GA locked
ReduceDefaultCrashLoopBackOffDecay false A
RelaxedDNSSearchValidation true GA locked
RelaxedEnvironmentVariableValidation true GA locked
RelaxedServiceNameValidation false A
ReloadKubeletServerCertificateFile true B
RemoteRequestHeaderUID true B
ResilientWatchCacheInitialization true GA locked
ResourceHealthStatus false A
RetryGenerateName true GA locked
RotateKubeletServerCertificate true B
RuntimeClassInImageCriAPI false A
SchedulerAsyncAPICalls true B
SchedulerAsyncPreemption true B
SchedulerPopFromBackoffQ true B
SchedulerQueueingHints true GA locked
SELinuxChangePolicy true B
SELinuxMount false B
SELinuxMountReadWriteOncePod true B
SeparateCacheWatchRPC false D
SeparateTaintEvictionController true GA locked
ServiceAccountNodeAudienceRestriction true B
ServiceAccountTokenJTI true GA locked
ServiceAccountTokenNodeBinding true GA locked
ServiceAccountTokenNodeBindingValidation true GA locked
ServiceAccountTokenPodNodeInfo true GA locked
ServiceTrafficDistribution true GA locked
SidecarContainers true GA locked
SizeBasedListCostEstimate true B
SizeMemoryBackedVolumes true GA locked
StatefulSetAutoDeletePVC true GA locked
StorageCapacityScoring false A
StorageNamespaceIndex true D
StorageVersionAPI false A
StorageVersionHash true B
StorageVersionMigrator false A
StreamingCollectionEncodingToJSON true GA locked
StreamingCollectionEncodingToProtobuf true GA locked
StrictCostEnforcementForVAP true GA locked
StrictCostEnforcementForWebhooks true GA locked
StrictIPCIDRValidation false A
StructuredAuthenticationConfiguration true GA locked
StructuredAuthenticationConfigurationEgressSelector true B
StructuredAuthorizationConfiguration true GA locked
SupplementalGroupsPolicy true B
SystemdWatchdog true B
TokenRequestServiceAccountUIDValidation true B
TopologyAwareHints true GA locked
TopologyManagerPolicyAlphaOptions false A
TopologyManagerPolicyBetaOptions true B
TopologyManagerPolicyOptions true GA
TranslateStreamCloseWebsocketRequests true B
UnauthenticatedHTTP2DOSMitigation true B
UnknownVersionInteroperabilityProxy false A
UserNamespacesPodSecurityStandards false A
UserNamespacesSupport true B
VolumeAttributesClass false B
WatchCacheInitializationPostStartHook false B
WatchFromStorageWithoutResourceVersion false D locked
WatchList false B
WatchListClient true B
WindowsCPUAndMemoryAffinity false A
WindowsGracefulNodeShutdown false A
WindowsHostNetwork false D
WinDSR true B
WinOverlay true B
"""


def _load(table: str) -> dict[str, Gate]:
    gates: dict[str, Gate] = {}
    for row in table.strip().splitlines():
        name, default, stage, *rest = row.split()
        gates[name] = Gate(name, default == "true", _STAGES[stage], rest == ["locked"])
    return gates


KNOWN: Mapping[str, Gate] = _load(_TABLE)

#: component-base's meta gates: set every alpha / beta gate at once.
SPECIAL = frozenset({"AllAlpha", "AllBeta"})

#: Gates whose value changes what kproxy does. None yet: kproxy behaves as upstream does with
#: every gate at its default (e.g. trafficDistribution and nftables mode are always on).
IMPLEMENTED: frozenset[str] = frozenset()


def parse(value: object) -> dict[str, bool]:
    """``A=true,B=false`` (flag) or a mapping (config file) to ``{name: bool}``; raises
    `OptionError` with upstream's wording for an unknown or locked gate or a non-bool value."""
    result: dict[str, bool] = {}
    for name, raw in MAPPING.parse(value).items():
        if name not in KNOWN and name not in SPECIAL:
            raise OptionError(f"unrecognized feature gate: {name}")
        try:
            enabled = BOOLEAN.parse(raw)
        except OptionError:
            raise OptionError(
                f"invalid value of {name}={raw}: expected true or false") from None
        gate = KNOWN.get(name)
        if gate is not None and gate.locked and enabled != gate.default:
            raise OptionError(f"cannot set feature gate {name} to {str(enabled).lower()}, "
                              f"feature is locked to {str(gate.default).lower()}")
        result[name] = enabled
    return result


def notes(gates: Mapping[str, bool]) -> list[str]:
    """One line per gate that is set: upstream's GA/deprecation warning, and that kproxy
    ignores the gates it does not implement."""
    lines: list[str] = []
    for name in sorted(gates):
        value = str(gates[name]).lower()
        gate = KNOWN.get(name)
        if gate is not None and gate.stage in ("GA", "Deprecated"):
            kind = "GA" if gate.stage == "GA" else "deprecated"
            lines.append(f"setting {kind} feature gate {name}={value}: it will be removed in "
                         "a future release")
        if name not in IMPLEMENTED:
            lines.append(f"feature gate {name}={value} is recognised but kproxy does not "
                         "implement it: ignored")
    return lines
